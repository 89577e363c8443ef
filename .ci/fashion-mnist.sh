#!/usr/bin/env bash
# Fashion-MNIST without a download from its own site: Debian's dataset-fashion-mnist puts the
# IDX files in /usr/share/datasets/fashion-mnist, where lit_surgery looks for them.
# Installs it with apt if missing (as .ci/postgres.sh installs PostgreSQL); idempotent.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
[ -f "$DIR/train-images-idx3-ubyte.gz" ] && exit 0
bash "$(dirname "$0")/apt-install.sh" dataset-fashion-mnist
[ -f "$DIR/train-images-idx3-ubyte.gz" ] || {
  echo "fashion-mnist.sh: installed, but $DIR has no train-images-idx3-ubyte.gz" >&2; exit 1; }
