#!/bin/bash
# ab.sh NAMES...: unpack, check CHECKS (seed SEED, NSEEDS), then ptime alternating REPS times over PFS
D=$(cd $(dirname $0) && pwd)
for n in "$@"; do [ -f /tmp/h_$n ] || { xz -dc $D/$n.xz > /tmp/h_$n; chmod +x /tmp/h_$n; }; done
for n in $CHECKS; do timeout 150 /tmp/h_$n check ${SEED:-1} ${NSEEDS:-1} > $OUT/check_$n.txt 2>&1; echo "check $n rc=$?: $(tail -1 $OUT/check_$n.txt)"; done
for r in $(seq ${REPS:-2}); do for n in "$@"; do
  for pf in ${PFS:-32,16384}; do TOPT_PF_ONLY=$pf timeout 30 /tmp/h_$n ptime | tail -n +2 | sed "s/^/$n r$r  /"; done
done; done | tee $OUT/ptime.txt
