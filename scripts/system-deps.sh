#!/usr/bin/env bash
# Installs the Debian packages workflow-agent needs on this machine (run as root).
#   scripts/system-deps.sh          what `make demo` needs: the sandbox target's tools
#   scripts/system-deps.sh --test   plus what the test suite needs
set -euo pipefail

packages=(mmdebstrap util-linux iproute2)
if [[ "${1:-}" == "--test" ]]; then
  # systemd-container: systemd-nspawn, which boots the systemd sandbox target.
  # docker.io: the Docker engine the docker target tests start by hand.
  packages+=(procps postgresql systemd-container docker.io)
  # socat: the SSH lab's forwarder to Debian's archive (tests/lab.py).
  packages+=(socat)
  # groff: renders Debian's man pages as HTML and text for the knowledge parser tests;
  # apt-get download fetches those packages (tests/doc_server.py).
  packages+=(groff)
fi

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "workflow-agent needs these Debian packages: ${missing[*]}" >&2
  echo "Install them as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "Installing Debian packages: ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
