#!/usr/bin/env bash
# Session 22, call 1: a longer schedule for the medical students (60 epochs per stage, twice
# the shipped 30), distilled from the committed teacher. Seeds 0 and 1; each student runs in
# its own process (--medical-skip-scratch / --medical-skip-distilled) so the four fit one
# call; 3 CPU threads each. Host memory and GPU use are sampled every 20 s.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/w keel_outputs
T0=$(date +%s)
( while true; do echo "$(( $(date +%s) - T0 )) s $(free -g | awk '/Mem:/{print "used_GiB="$3}') $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; sleep 20; done ) > $OUT/w/monitor.log 2>&1 &
MON=$!
python -m bench.medical_bench --prepare keel_outputs/mb --n-series 128 > $OUT/w/med_prep.log 2>&1
echo "prep done $(( $(date +%s) - T0 )) s" | tee -a $OUT/w/med_prep.log
EPOCHS=${EPOCHS:-60}
for S in ${SEEDS:-0 1}; do
  for KIND in distilled scratch; do
    if [ $KIND = distilled ]; then SKIP=--medical-skip-scratch; else SKIP=--medical-skip-distilled; fi
    D=$OUT/w/s${S}_$KIND; mkdir -p $D
    ( KEEL_BENCH_RESULTS=$D timeout ${LIMIT:-530} python -m bench.scale_bench --device cuda --apps medical --skip-growth --medical-detector dense --medical-epochs $EPOCHS --medical-data keel_outputs/mb --medical-teacher-dir bench/artifacts/medical_teacher --medical-student-d 32 --medical-student-stem 16 --medical-student-full-attention $SKIP --seed $S --threads 3 > $D.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s" >> $D.log ) &
  done
done
wait $(jobs -p | grep -v "^$MON$")
kill $MON
grep -H "rc=" $OUT/w/*.log
cd $OUT && tar czf results.tgz w && rm -rf w
ls -la $OUT
