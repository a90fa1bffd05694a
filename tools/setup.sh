#!/usr/bin/env bash
# Idempotent set-up on Debian 12 with the .NET 10 SDK: the Debian packages FrugalLM uses, then a Release
# build (which also prepares TorchSharp's native glue for this system's libstdc++).
#   bible-kjv      the King James Bible, the bundled model's public-domain corpus (tools/kjv-corpus.sh)
#   fortunes-min   extra real text for the tokenizer tests
#   python3-torch  PyTorch 1.13 for /usr/bin/python3: the PEFT adapter check in the tests and the peer of frugal bench
#   libopenblas0-pthread  the BLAS that peer measures with (tools/README.md)
#   openmpi-bin    mpirun and libmpi.so.40: frugal launch and the distributed collectives (docs/distributed.md)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(bible-kjv fortunes-min python3-torch libopenblas0-pthread openmpi-bin)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing ${missing[*]} ..." >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -s data/kjv.txt ] || tools/kjv-corpus.sh data/kjv.txt >&2
dotnet build FrugalLM.slnx -c Release --nologo -v q -clp:ErrorsOnly
