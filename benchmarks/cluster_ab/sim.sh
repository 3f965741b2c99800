#!/usr/bin/env bash
# Part 2: same slice/settings in the simulator. Run from the repo root.
T=trace:/work/shared/data/traces/azure_conv_2023.csv
C="--workload $T -n 100 --time-scale 4 --max-context 1024 --instances 2 --num-blocks 233 --slo-ttft-ms 5000 --slo-tpot-ms 250"
D=benchmarks/cluster_ab
shoal sim $C --dispatch round_robin --migration none    --out $D/sim_rr
shoal sim $C --dispatch least_load  --migration llumnix --out $D/sim_ll
# cost model x1.8 (rough stand-in for the 1 torch thread each Ray instance gets)
shoal sim $C --dispatch round_robin --migration none    --cost-model $D/profile_1thread_x1.8.json --out $D/sim1t_rr
shoal sim $C --dispatch least_load  --migration llumnix --cost-model $D/profile_1thread_x1.8.json --out $D/sim1t_ll
