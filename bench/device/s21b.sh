#!/usr/bin/env bash
# Session 21, call 2: the shipped medical student (d32, stem 16, full attention, 30 epochs,
# T 0.5, alpha 0.7) and its scratch twin, seeds 0 and 1 side by side, distilled from the
# committed teacher bench/artifacts/medical_teacher (CPM 0.889); 7 CPU threads each.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/w keel_outputs
T0=$(date +%s)
python -m bench.medical_bench --prepare keel_outputs/mb --n-series 128 > $OUT/w/med_prep.log 2>&1
echo "prep done $(( $(date +%s) - T0 )) s" | tee -a $OUT/w/med_prep.log
for S in ${SEEDS:-0 1}; do
  mkdir -p $OUT/w/s$S
  ( KEEL_BENCH_RESULTS=$OUT/w/s$S timeout 540 python -m bench.scale_bench --device cuda --apps medical --skip-growth --medical-detector dense --medical-epochs 30 --medical-data keel_outputs/mb --medical-teacher-dir bench/artifacts/medical_teacher --medical-student-d 32 --medical-student-stem 16 --medical-student-full-attention --seed $S --threads 7 > $OUT/w/s$S.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/w/s$S.log ) &
done
wait
grep -h "rc=" $OUT/w/s*.log
cd $OUT && tar czf results.tgz w && rm -rf w
ls -la $OUT
