#!/bin/bash
# Cluster environment before/after TensorFlow leaves it: a 17.3 LTS-like base (untimed), then the
# databricks.yaml libraries pip-installed on top (timed, no pip cache), as Databricks installs them.
# Run from anywhere: bash benchmarks/cluster_environment.sh (PYTHON312=/path/to/python3.12); results in /tmp/clusterenv/results.txt.
set -u
unset PIP_FIND_LINKS  # measure what a cluster downloads from the registry, not a local wheel folder
mkdir -p /tmp/clusterenv && cd /tmp/clusterenv && : > results.txt
BASE="pyspark==4.0.0 numpy==2.1.3 pandas==2.2.3 pyarrow==19.0.1 pillow==11.1.0 protobuf==5.29.4"
COMMON="dagster==1.13.27 dagster-pyspark==0.29.27 dagster-aws==0.29.27 dagster-databricks==0.29.27 deltalake==1.6.6 onnxruntime==1.32.0 pillow==13.0.0 pyarrow==26.0.1 matplotlib==3.11.2"
BEFORE="$COMMON tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnx==1.23.2"
AFTER="$COMMON"
for name in before after; do
  env=/tmp/clusterenv/env_$name
  rm -rf $env
  "${PYTHON312:-python3.12}" -m venv $env
  $env/bin/pip install -q --upgrade pip >/dev/null 2>&1
  $env/bin/pip install -q $BASE > $name.base.log 2>&1
  base_kb=$(du -sk $env | cut -f1)
  libs=$([ $name = before ] && echo "$BEFORE" || echo "$AFTER")
  start=$(date +%s.%N)
  $env/bin/pip install --no-cache-dir $libs > $name.libs.log 2>&1; rc=$?
  end=$(date +%s.%N)
  total_kb=$(du -sk $env | cut -f1)
  echo "$name rc=$rc install_seconds=$(echo "$end - $start" | bc) base_MB=$((base_kb/1024)) total_MB=$((total_kb/1024)) libraries_MB=$(((total_kb-base_kb)/1024)) $(du -sh $env | cut -f1)" >> results.txt
done
echo done >> results.txt
