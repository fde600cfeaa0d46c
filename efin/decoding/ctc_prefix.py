"""CTC prefix scores: how likely the audio is to begin with a token sequence, under a CTC model.

The prefix probability of a label sequence g is the total probability of every CTC path whose
collapsed labels start with g (Watanabe et al. 2017, "Hybrid CTC/attention architecture for
end-to-end speech recognition"; ESPnet's ``CTCPrefixScore``). Per prefix it keeps, for every
frame t, the log probabilities that the first t+1 frames collapse to exactly g and end in a
non-blank (r^n_t) or in a blank (r^b_t). Then

* ``prefix(g + c) = log sum_t phi_t-1 x_t(c)``, where phi_t = r^n_t + r^b_t, or only r^b_t when
  c repeats the last label of g (two equal labels need a blank between them);
* ``end(g) = log(r^n_T-1 + r^b_T-1)``: the probability of exactly g (the sequence CTC loss
  scores), used when a hypothesis ends.

Labels are CTC classes (0 = blank). Everything is float32 log space over one utterance.
:meth:`CTCPrefixScorer.next_scores` scores every class after a set of prefixes at once (one
vectorised log-sum-exp); only the prefixes a search keeps pay for the frame-by-frame recursion
(:meth:`CTCPrefixScorer.extend`, in closed form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class CTCPrefixState:
    """H prefixes of one utterance.

    r: (H, N, 2) float32 log r^n_t (index 0) and r^b_t (index 1) per frame.
    score: (H,) float32 log prefix probability of each prefix (0 for the empty one).
    last: (H,) long, last label of each prefix (-1 for the empty one).
    length: (H,) long, labels in each prefix.
    """

    r: torch.Tensor
    score: torch.Tensor
    last: torch.Tensor
    length: torch.Tensor

    def select(self, rows: torch.Tensor) -> CTCPrefixState:
        """The prefixes ``rows`` (H',) in that order (repeats allowed)."""
        return CTCPrefixState(self.r[rows], self.score[rows], self.last[rows], self.length[rows])

    @staticmethod
    def cat(states: list[CTCPrefixState]) -> CTCPrefixState:
        """The prefixes of ``states``, one after the other."""
        return CTCPrefixState(*(torch.cat([getattr(s, f) for s in states]) for f in ("r", "score", "last", "length")))


class CTCPrefixScorer:
    """Prefix scores of label sequences under one utterance's CTC posteriors.

    Args:
        log_probs: (N, C) log-probabilities per frame, class 0 = blank (valid frames only).
            With N = 0 there is no audio: only the empty sequence has probability 1.
    """

    def __init__(self, log_probs: torch.Tensor):
        log_probs = log_probs.float()
        if log_probs.shape[0] == 0:  # one certain blank frame: the empty sequence only
            log_probs = torch.full((1, log_probs.shape[1]), NEG_INF, device=log_probs.device)
            log_probs[0, 0] = 0.0
        self.log_probs = log_probs

    @property
    def num_frames(self) -> int:
        return self.log_probs.shape[0]

    def initial_state(self) -> CTCPrefixState:
        """The empty prefix: r^n = 0 everywhere, r^b_t = blanks up to t."""
        x = self.log_probs
        r = torch.full((1, x.shape[0], 2), NEG_INF, device=x.device)
        r[0, :, 1] = torch.cumsum(x[:, 0], dim=0)
        zero = torch.zeros(1, dtype=torch.long, device=x.device)
        return CTCPrefixState(r, torch.zeros(1, device=x.device), zero - 1, zero)

    def _phi(self, state: CTCPrefixState) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, N) log(r^n + r^b) and (H, N) log r^b: phi for a new label, and for a repeat."""
        return torch.logaddexp(state.r[..., 0], state.r[..., 1]), state.r[..., 1]

    def next_scores(self, state: CTCPrefixState) -> torch.Tensor:
        """(H, C) log prefix probability of each prefix followed by each class (column 0, the
        blank, is -inf). Memory is H x N x C floats."""
        x = self.log_probs
        phi, phi_repeat = self._phi(state)
        # c first emitted at frame t >= 1 (after the prefix, up to t - 1): phi_t-1 + x_t(c)
        terms = phi[:, :-1, None] + x[None, 1:, :]  # (H, N-1, C)
        repeat = state.last >= 0
        if repeat.any():
            rows = repeat.nonzero()[:, 0]
            last = state.last[rows]
            terms[rows, :, last] = phi_repeat[rows, :-1] + x[1:, last].T
        scores = torch.logsumexp(terms, dim=1) if x.shape[0] > 1 else terms.new_full((len(phi), x.shape[1]), NEG_INF)
        # frame 0 can start the first label only
        first = torch.where(state.length[:, None] == 0, x[None, 0, :], torch.full_like(scores, NEG_INF))
        scores = torch.logaddexp(scores, first)
        scores[:, 0] = NEG_INF
        return scores

    def extend(self, state: CTCPrefixState, labels: torch.Tensor, scores: torch.Tensor | None = None) -> CTCPrefixState:
        """The prefixes ``state`` (H) each followed by one label ``labels`` (H,) (classes >= 1).

        ``scores`` (H,): their prefix scores when known (from :meth:`next_scores`); else
        computed here. Cost: a few (H, N) tensor operations (the frame recursions in closed form).
        """
        x = self.log_probs
        phi, phi_repeat = self._phi(state)
        phi = torch.where((labels == state.last)[:, None], phi_repeat, phi)  # (H, N)
        xc = x[:, labels].T  # (H, N)
        blank = x[:, 0].expand_as(xc)
        n = xc.shape[1]
        r_n0 = torch.where(state.length == 0, xc[:, 0], torch.full_like(xc[:, 0], NEG_INF))
        # r^n_t = logaddexp(r^n_t-1, phi_t-1) + x_t(c);  r^b_t = logaddexp(r^n_t-1, r^b_t-1) + x_t(blank)
        r_n = _log_linear_recursion(r_n0, phi[:, :-1], xc[:, 1:])
        r_b = _log_linear_recursion(torch.full_like(r_n0, NEG_INF), r_n[:, :-1], blank[:, 1:])
        if scores is None:
            scores = torch.logaddexp(r_n[:, 0], torch.logsumexp(phi[:, :-1] + xc[:, 1:], dim=1)) if n > 1 else r_n[:, 0]
        return CTCPrefixState(torch.stack([r_n, r_b], dim=-1), scores, labels.clone(), state.length + 1)

    @staticmethod
    def end_scores(state: CTCPrefixState) -> torch.Tensor:
        """(H,) log probability that the audio is exactly each prefix (no more labels)."""
        return torch.logaddexp(state.r[:, -1, 0], state.r[:, -1, 1])


# Per-frame log-probabilities are floored here in the closed form below (a -inf one would make it
# inf - inf); results under IMPOSSIBLE are impossible sequences, returned as -inf again.
LOG_FLOOR, IMPOSSIBLE = -1.0e8, -1.0e7


def _log_linear_recursion(first: torch.Tensor, inputs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(H, N) log y_t of ``y_0 = exp(first)``, ``y_t = (y_t-1 + exp(inputs_t-1)) x exp(steps_t-1)``
    for t = 1..N-1, from first (H,), inputs (H, N-1), steps (H, N-1), all in log space.

    CTC's frame recursions in closed form, vectorised over frames instead of a loop over them:
    with ``S_t = steps_0 + ... + steps_t-1``, ``log y_t = S_t + logcumsumexp(first, inputs_s - S_s)``
    (s < t). Computed in float64: S_t reaches -1e4 in long utterances, where float32's rounding
    would show.
    """
    dtype = first.dtype
    steps = steps.double().clamp_min(LOG_FLOOR)
    cum = torch.cat([steps.new_zeros(len(steps), 1), steps.cumsum(dim=1)], dim=1)  # (H, N): S_0 = 0 .. S_N-1
    z = torch.cat([first.double()[:, None], inputs.double() - cum[:, :-1]], dim=1)
    out = cum + torch.logcumsumexp(z, dim=1)
    return out.masked_fill(out < IMPOSSIBLE, NEG_INF).to(dtype)


class LabelSequenceScores:
    """Prefix and end scores of arbitrary label sequences under one utterance's CTC posteriors,
    each sequence extended from its longest already-scored prefix (a cache shared by a search's
    hypotheses, which share prefixes). Extending many sequences by one label is one
    :meth:`CTCPrefixScorer.extend` call, so a batch of candidates k labels longer than their
    hypotheses costs k frame recursions.

    Args:
        log_probs: (N, C) log-probabilities per frame, class 0 = blank.
    """

    def __init__(self, log_probs: torch.Tensor):
        self.scorer = CTCPrefixScorer(log_probs)
        self._states: dict[tuple[int, ...], CTCPrefixState] = {(): self.scorer.initial_state()}

    def _ensure(self, sequences: list[tuple[int, ...]]) -> None:
        todo = {s for s in sequences if s not in self._states}
        while todo:
            parents: dict[tuple[int, ...], tuple[int, ...]] = {}  # child -> its scored parent
            for seq in todo:
                i = len(seq) - 1
                while seq[:i] not in self._states:
                    i -= 1
                parents[seq[: i + 1]] = seq[:i]
            children = list(parents)
            state = CTCPrefixState.cat([self._states[parents[c]] for c in children])
            labels = torch.tensor([c[-1] for c in children], dtype=torch.long, device=state.r.device)
            extended = self.scorer.extend(state, labels)
            for j, child in enumerate(children):
                self._states[child] = extended.select(torch.tensor([j], device=state.r.device))
            todo = {s for s in todo if s not in self._states}

    def prefix(self, sequences: list[tuple[int, ...]]) -> torch.Tensor:
        """(len(sequences),) log probability that the audio begins with each sequence."""
        self._ensure(sequences)
        return torch.cat([self._states[s].score for s in sequences])

    def best_continuation(self, sequence: tuple[int, ...], max_labels: int) -> tuple[int, ...]:
        """Up to ``max_labels`` labels that most likely follow ``sequence``, one at a time (each
        the best next label, stopping where ending the sequence is likelier)."""
        out = tuple(sequence)
        for _ in range(max_labels):
            self._ensure([out])
            state = self._states[out]
            scores = self.scorer.next_scores(state)[0]
            best = int(scores.argmax())
            if scores[best] <= CTCPrefixScorer.end_scores(state)[0]:
                break
            out = (*out, best)
        return out[len(sequence):]

    def end(self, sequences: list[tuple[int, ...]]) -> torch.Tensor:
        """(len(sequences),) log probability that the audio is exactly each sequence."""
        self._ensure(sequences)
        return CTCPrefixScorer.end_scores(CTCPrefixState.cat([self._states[s] for s in sequences]))
