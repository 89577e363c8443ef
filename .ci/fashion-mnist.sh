#!/usr/bin/env bash
# Fashion-MNIST without a download from its own site: Debian's dataset-fashion-mnist puts the
# IDX files in /usr/share/datasets/fashion-mnist, where lit_surgery looks for them.
# Installs it with apt if missing (as .ci/postgres.sh installs PostgreSQL); idempotent.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
[ -f "$DIR/train-images-idx3-ubyte.gz" ] && exit 0
log() { echo "fashion-mnist.sh: $*" >&2; }
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { log "run as root or install dataset-fashion-mnist (apt)"; exit 1; }
  sudo="sudo -n"
fi
command -v apt-get >/dev/null || { log "no apt-get: put the Fashion-MNIST IDX files in $DIR"; exit 1; }
log "installing dataset-fashion-mnist (apt-get, about 30 MB)"
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >&2
[ -f "$DIR/train-images-idx3-ubyte.gz" ] || { log "installed, but $DIR has no train-images-idx3-ubyte.gz"; exit 1; }
