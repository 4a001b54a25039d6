#!/usr/bin/env bash
# On a machine with a package index: download what a bare GPU box (Python 3.12, torch and
# torchvision already there) needs to run the benches, into .whl/ (git-ignored; the device tool
# takes it along when a call names it in `carry`). bench/device-run.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
for spec in pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
            typing_extensions==4.16.0 kornia==0.9.0 kornia_rs==0.2.0 \
            lightly==1.6.0 lightning-utilities==0.15.3 tqdm==4.70.1 packaging==26.4; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${WHEEL_PY:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -1 .whl
