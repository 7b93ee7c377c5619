#!/bin/bash
# Labelled runs of the corpus entries audio_stft and sklearn_columns (frontends.py): top-1 in onnxruntime before
# and after, one thread, 4 epochs. Usage: samples/corpus/frontends_measure.sh WORK_FOLDER
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "${1:?work folder}" && cd "$1" || exit 1
python - "$HERE" <<'P'
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import frontends
from pathlib import Path
frontends.build_audio(Path("audio.onnx"))
c, k = frontends.make_clips(1536, 1); np.savez("audio_train.npz", wave=c, labels=k)
c, k = frontends.make_clips(512, 2); np.savez("audio_test.npz", wave=c, labels=k)
_, x, y = frontends.build_columns(Path("columns.onnx"))
np.savez("col_train.npz", X=x[:1400], labels=y[:1400]); np.savez("col_test.npz", X=x[1400:], labels=y[1400:])
P
for m in audio columns; do
  pre=$([ $m = audio ] && echo audio || echo col)
  for sp in 0.5 0.9; do
    onnx-admm compress $m.onnx -o $m-$sp.onnx --data ${pre}_train.npz --val-data ${pre}_test.npz --sparsity $sp --epochs 4 --threads 1 --report $m-$sp.json > $m-$sp.log 2>&1; rc=$?
    echo "$(date +%T) $m $sp rc=$rc $(grep -E 'held-out' $m-$sp.log | tail -1)"
  done
done
for m in audio columns; do
  pre=$([ $m = audio ] && echo audio || echo col)
  onnx-admm compress $m.onnx -o $m-f.onnx --data ${pre}_train.npz --val-data ${pre}_test.npz --structure filter --sparsity 0.5 --epochs 4 --threads 1 --report $m-f.json > $m-f.log 2>&1; rc=$?
  echo "$(date +%T) $m filter0.5 rc=$rc $(grep -E 'held-out|file:' $m-f.log | tail -2 | tr '\n' ' ')"
  onnx-admm compress $m.onnx -o $m-b.onnx --data ${pre}_train.npz --val-data ${pre}_test.npz --binary --epochs 4 --threads 1 --report $m-b.json > $m-b.log 2>&1; rc=$?
  echo "$(date +%T) $m binary rc=$rc $(grep -E 'held-out|file:' $m-b.log | tail -2 | tr '\n' ' ')"
done
