#!/usr/bin/env bash
# Install Debian packages for the tests: `bash .ci/apt-install.sh PACKAGE...` (as root, or
# with passwordless sudo). Used by .ci/postgres.sh and .ci/fashion-mnist.sh.
set -euo pipefail
log() { echo "apt-install.sh: $*" >&2; }
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { log "run as root, or install with apt-get: $*"; exit 1; }
  sudo="sudo -n"
fi
command -v apt-get >/dev/null || { log "there is no apt-get; install these yourself: $*"; exit 1; }
log "installing $* (apt-get)"
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >&2
