#!/usr/bin/env bash
# Session 23: s22b.sh's 60-epoch medical students with the teacher term's weight lowered,
# --alpha ${ALPHA} (default 0.3; the shipped recipe uses 0.7). JOBS lists seed:kind as in
# s22b.sh; only distilled students are run here, because alpha does not touch the scratch
# student (its session 22 runs are the comparison). Three processes per call, not four: four
# ended 6-70 s before s22b.sh's per-process limit.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/w keel_outputs
T0=$(date +%s)
( while true; do echo "$(( $(date +%s) - T0 )) s $(free -g | awk '/Mem:/{print "used_GiB="$3}') $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; sleep 20; done ) > $OUT/w/monitor.log 2>&1 &
MON=$!
[ -f keel_outputs/mb/truth.csv ] || [ -d keel_outputs/mb/npz ] || python -m bench.medical_bench --prepare keel_outputs/mb --n-series 128 > $OUT/w/med_prep.log 2>&1
echo "prep done $(( $(date +%s) - T0 )) s" | tee -a $OUT/w/med_prep.log
PIDS=""
for J in ${JOBS:?}; do
  S=${J%%:*}; KIND=${J##*:}
  if [ $KIND = distilled ]; then SKIP=--medical-skip-scratch; else SKIP=--medical-skip-distilled; fi
  D=$OUT/w/s${S}_$KIND; mkdir -p $D
  ( KEEL_BENCH_RESULTS=$D timeout ${LIMIT:-530} python -m bench.scale_bench --device cuda --apps medical --skip-growth --medical-detector dense --medical-epochs ${EPOCHS:-60} --medical-data keel_outputs/mb --medical-teacher-dir bench/artifacts/medical_teacher --medical-student-d 32 --medical-student-stem 16 --medical-student-full-attention $SKIP --score-batches 256 --alpha ${ALPHA:-0.3} --seed $S --threads 3 > $D.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s" >> $D.log ) &
  PIDS="$PIDS $!"
done
wait $PIDS
kill $MON
grep -H "rc=" $OUT/w/*.log
cd $OUT && tar czf results.tgz w && rm -rf w
ls -la $OUT
