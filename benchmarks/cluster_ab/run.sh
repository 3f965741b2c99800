#!/usr/bin/env bash
# Reproduce one A/B run on the 2-instance Ray cluster.
#   usage: benchmarks/cluster_ab/run.sh rr|ll|co|pd|pl RUN_NAME
#   rr = --dispatch round_robin --migration none
#   ll = --dispatch least_load  --migration llumnix
#   co = --dispatch least_load  --migration none   (co-located, the P/D baseline)
#   pd = --dispatch least_load  --migration none --roles prefill,decode
#   pl = --dispatch predicted_latency --migration llumnix (the defaults), SLO given to the server
# Run from the repo root. Starts the server, waits for /health, replays the Azure slice,
# scrapes /metrics, stops the server and Ray.
set -u
CFG=${1:?rr|ll|co|pd|pl}; NAME=${2:?run name}
TRACE=/work/shared/data/traces/azure_conv_2023.csv
PORT=${PORT:-8000}
KV_GB=${KV_GB:-0.08}          # 0.08 GiB = 233 blocks of 16 tokens (360 KiB each) per instance
MAX_LEN=${MAX_LEN:-1024}      # bench serve clips trace requests to this (server's max_model_len)
TS=${TS:-4}; N=${N:-100}
SLO_TTFT=${SLO_TTFT:-5000}; SLO_TPOT=${SLO_TPOT:-250}
case $CFG in
  rr) POL="--dispatch round_robin --migration none" ;;
  ll) POL="--dispatch least_load --migration llumnix" ;;
  co) POL="--dispatch least_load --migration none" ;;
  pd) POL="--dispatch least_load --migration none --roles prefill,decode" ;;
  pl) POL="--dispatch predicted_latency --migration llumnix --slo-ttft-ms $SLO_TTFT --slo-tpot-ms $SLO_TPOT" ;;
  *) echo "bad config $CFG"; exit 2 ;;
esac
OUT=benchmarks/cluster_ab/$NAME
mkdir -p "$OUT"
shoal serve --instances 2 --instance-threads 1,1 $POL --kv-cache-gb $KV_GB --max-model-len $MAX_LEN --port $PORT \
  > "$OUT/server.log" 2>&1 &
SPID=$!
echo "server pid $SPID"
for i in $(seq 1 300); do
  curl -sf http://127.0.0.1:$PORT/health >/dev/null && break
  kill -0 $SPID 2>/dev/null || { echo "server died"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 1
done
echo "ready after ${i}s"
/usr/bin/time -f "bench wall %e s" shoal bench serve --url http://127.0.0.1:$PORT \
  --workload trace:$TRACE --time-scale $TS -n $N \
  --slo-ttft-ms $SLO_TTFT --slo-tpot-ms $SLO_TPOT --out "$OUT" > "$OUT/bench.log" 2>&1
curl -s http://127.0.0.1:$PORT/metrics > "$OUT/metrics.txt"
kill -INT $SPID; sleep 5; kill -0 $SPID 2>/dev/null && kill $SPID; sleep 2
kill -0 $SPID 2>/dev/null && kill -9 $SPID
wait $SPID 2>/dev/null
ray stop --force > /dev/null 2>&1
echo "done $NAME"
