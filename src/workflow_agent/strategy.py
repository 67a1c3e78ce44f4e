"""Choosing how to install: score each method of an integration against the facts.

Deciding only: nothing here touches a target. The decision says why the winner won and
why each loser lost, so ``plan`` can show it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from workflow_agent.errors import UnsupportedPlatformError
from workflow_agent.facts import Facts
from workflow_agent.integrations.schema import Definition, MethodSpec, PlatformSpec

# Compatibility is a gate; among compatible methods, simpler and safer wins.
COMPLEXITY_WEIGHT = 0.5
SECURITY_WEIGHT = 0.5


class MethodScore(BaseModel):
    """How one method fits the target."""

    model_config = ConfigDict(frozen=True)

    method: str
    compatible: bool
    reasons: list[str]
    complexity: int
    security: int
    score: float


class StrategyDecision(BaseModel):
    """The chosen method and every method's score, best first."""

    model_config = ConfigDict(frozen=True)

    method: str
    reason: str
    scores: list[MethodScore]


def _fact_value(facts: Facts, key: str) -> str:
    value = getattr(facts, key, None)
    return "" if value is None else str(value)


def platform_matches(platform: PlatformSpec, facts: Facts) -> bool:
    """True when the target's facts fall inside ``platform``."""
    return (
        platform.os_family == facts.os_family
        and (not platform.distros or facts.distro in platform.distros)
        and (not platform.versions or facts.distro_version in platform.versions)
        and (not platform.arch or facts.arch in platform.arch)
    )


def _describe(platform: PlatformSpec) -> str:
    parts = [platform.os_family]
    if platform.distros:
        parts.append("/".join(platform.distros))
    if platform.versions:
        parts.append("versions " + ", ".join(platform.versions))
    if platform.arch:
        parts.append("on " + ", ".join(platform.arch))
    return " ".join(parts)


def score_method(method: MethodSpec, facts: Facts) -> MethodScore:
    """Score one method: incompatible methods score 0 and say which fact is wrong."""
    reasons: list[str] = []
    for key, wanted in method.requires.items():
        allowed = [wanted] if isinstance(wanted, str) else list(wanted)
        actual = _fact_value(facts, key)
        if actual not in allowed:
            reasons.append(f"needs {key} {' or '.join(allowed)}, target has {actual or 'none'}")
    compatible = not reasons
    if compatible:
        reasons.append(
            "all required facts match"
            if method.requires
            else "needs no particular facts"
        )
    score = 0.0
    if compatible:
        score = round(
            COMPLEXITY_WEIGHT * (6 - method.complexity) / 5 + SECURITY_WEIGHT * method.security / 5,
            3,
        )
    return MethodScore(
        method=method.name,
        compatible=compatible,
        reasons=reasons,
        complexity=method.complexity,
        security=method.security,
        score=score,
    )


def select_method(definition: Definition, facts: Facts) -> StrategyDecision:
    """Pick the best compatible method, or explain why the target is unsupported."""
    target_desc = (
        f"{facts.distro} {facts.distro_version} ({facts.os_family}, {facts.arch})"
    )
    if not any(platform_matches(p, facts) for p in definition.platforms):
        supported = "; ".join(_describe(p) for p in definition.platforms)
        raise UnsupportedPlatformError(
            f"{definition.name} does not support {target_desc}",
            hint=f"Supported platforms: {supported}.",
        )
    scores = sorted(
        (score_method(m, facts) for m in definition.methods),
        key=lambda s: (s.compatible, s.score),
        reverse=True,
    )
    best = scores[0]
    if not best.compatible:
        why = "; ".join(f"{s.method}: {', '.join(s.reasons)}" for s in scores)
        raise UnsupportedPlatformError(
            f"no installation method of {definition.name} fits {target_desc}",
            hint=f"Each method's requirements: {why}.",
        )
    runners_up = [s for s in scores[1:] if s.compatible]
    reason = f"{best.method}: {best.reasons[0]}; complexity {best.complexity}/5, " \
        f"security {best.security}/5, score {best.score}"
    if runners_up:
        reason += f" (beats {', '.join(f'{s.method} {s.score}' for s in runners_up)})"
    return StrategyDecision(method=best.method, reason=reason, scores=scores)
