#!/usr/bin/env bash
# Fill the two ignored folders the device scripts carry (run from the repository root, here,
# not on the device): .whl/ with the wheels the device image lacks, .carry/ with the C-MAPSS
# files (../shared does not travel) and these scripts. Then call the device tool with
# command "bash .carry/<script>" and carry [".carry", ".whl"] (64 MiB in all: polars'
# runtime alone is 54 MB, so it is fetched only with --polars, for the fraud benches).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.carry/' .git/info/exclude || echo '/.carry/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
pkgs=(monai pydicom==3.0.2)
[[ "${1:-}" == "--polars" ]] && pkgs+=(polars==2.1.0 polars-runtime-32==2.1.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
mkdir -p .carry
cp -r "${KEEL_DATA_DIR:-../shared/data}/maintenance/cmapss" .carry/
cp bench/device/*.sh .carry/
du -sh .whl .carry
