"""The CPU's PageRank importance kernel (``importance_kernel: factored``): the attention logits of
a head computed once and kept, with their column-shifted exponentials, while the five steps run
as matrix-vector products over them (docs/algorithms.md §3).

With L = q k^T * scale / T (causal and key masks: -inf), lse_i the log-normaliser of row i and
a_i = log p_t[i] - lse_i, one step is log p_{t+1}[j] = log sum_i exp(a_i + L_ij). The rows are cut
into blocks of :data:`ROW_BLOCK`; for block b and column j, c_bj = max_{i in b} L_ij and
E_bij = exp(L_ij - c_bj) are computed once, so that a step is, per block,

    S_bj = sum_{i in b} exp(a_i - A_b) E_bij        (A_b = max_{i in b} a_i: a batched GEMV)
    T_bj = A_b + c_bj + log S_bj,   log p_{t+1}[j] = logsumexp_b T_bj.

Each column of E has a 1 in every block, and each block's weights a 1, so S_bj is far from
float32's underflow unless the rows that weigh most in the block see j least. A block sum below
:data:`TRUSTED_SUM` is recomputed exactly in log space from the kept logits, unless even its upper
bound is negligible beside the column's trusted blocks; where many are (sharp attention, PageRank
mass on few rows), the whole panel's step is done in log space instead. The row normalisers come
the same way from E (a GEMV with exp(c_bj - max c)), rows below :data:`TRUSTED_ROW_SUM` recomputed
exactly. So the result is the log-space one (the published order wherever the published float32
scores differ); with soft attention at the cost of one exponential per logit in all.

Cost and memory: rows are taken in panels that only reach the keys they may see (the causal
triangle, not the square); per head the panel logits and exponentials are kept (about 4 N^2
bytes for a head at N tokens), heads in groups that fit :data:`GROUP_BYTES` (so that short inputs
take few, large operations); a head larger than the memory budget makes the caller use the chunked
kernel. Half-precision q and k are multiplied with float32 accumulation and output (oneDNN with
bfloat16 inputs, exact for bfloat16 values), never rounded to the model dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

ROW_BLOCK = 32  # rows sharing one column shift and one weight shift
PANEL_ROWS = 512  # rows per panel (a multiple of ROW_BLOCK); the last panel may be shorter
GROUP_BYTES = 256 * 2**20  # logits + exponentials of the heads processed together
EXP_FLOOR = -87.0  # exp() never sees less: results below float32's normal range take a ~10x slower path
TRUSTED_SUM = 2.0**-100  # a block sum at least this large is accurate to ~1e-6 (relative)
TRUSTED_ROW_SUM = 2.0**-80  # a row sum (up to N terms) at least this large, likewise
DENSE_REPAIR_SHARE = 1 / 16  # more untrusted block sums than this share of a panel's: redo it in log space
NEGLIGIBLE = 40.0  # nats below the column's trusted total: an untrusted block's bound is ignored
FLOOR_TERM = 2.0**-125  # what one dropped or floored term may have been worth (> e^-87, > 2^-149)
NEG_INF = float("-inf")


@contextlib.contextmanager
def exact_products(bf16_values: bool) -> Iterator[None]:
    """Float32 matrix products through oneDNN's bfloat16 path while inside, when the factors hold
    bfloat16 values (``bf16_values``: the upcast model-dtype q and k): exact products, float32
    accumulation and output, about 4x faster than IEEE float32 on CPUs with bfloat16 instructions.
    Any other float32 product inside would be rounded to bfloat16: only q k^T goes through it."""
    matmul = torch.backends.mkldnn.matmul
    if not bf16_values or not torch.backends.mkldnn.is_available():
        yield
        return
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


@dataclass(frozen=True)
class Panel:
    """Rows [start, start + rows) padded to ``blocks`` row blocks; keys [0, width)."""

    start: int
    rows: int
    blocks: int
    width: int


def panels(n: int, panel_rows: int = PANEL_ROWS) -> list[Panel]:
    """The row panels of an n-token causal matrix: each sees the keys up to its last row (panel
    rows rounded up to whole row blocks)."""
    panel_rows = -(-panel_rows // ROW_BLOCK) * ROW_BLOCK
    out = []
    for start in range(0, n, panel_rows):
        rows = min(panel_rows, n - start)
        out.append(Panel(start, rows, -(-rows // ROW_BLOCK), start + rows))
    return out


def resident_bytes(n: int, panel_rows: int = PANEL_ROWS) -> int:
    """Bytes of exponentials one head keeps at n tokens."""
    return sum(4 * p.blocks * ROW_BLOCK * p.width for p in panels(n, panel_rows))


def heads_per_group(n: int, heads: int, group_bytes: int = GROUP_BYTES) -> int:
    """How many heads are processed together at n tokens: as many as fit ``group_bytes`` (the
    steps then read their exponentials from the cache), at least one."""
    return max(1, min(heads, group_bytes // max(1, resident_bytes(n))))


def floored_exp_(x: torch.Tensor) -> torch.Tensor:
    """exp in place, arguments below :data:`EXP_FLOOR` raised to it first (-inf included)."""
    return x.clamp_(min=EXP_FLOOR).exp_()


class PanelMatrix:
    """One panel of a group of g heads: E = exp(scale * L - shift) [g, blocks, R, width], with
    ``shift`` [g, blocks, width] = scale * (the largest logit L_ij over each block's rows: -inf
    where ``dead``, no row of the block may attend the key). The logits themselves are not kept:
    the rare exact repairs recompute the rows they need from q and k."""

    def __init__(self, queries: torch.Tensor, keys: torch.Tensor, panel: Panel, scale: float,
                 blocked_keys: torch.Tensor | None, bf16_values: bool = False):
        self.panel = panel
        self.bf16_values = bf16_values  # q and k hold bfloat16 values: q k^T through exact_products
        self.queries = queries.view(queries.shape[0], panel.blocks, ROW_BLOCK, -1)  # [g, blocks, R, d]
        self.keys = keys[:, :panel.width]  # [g, width, d]
        self.scale = scale
        self.blocked_keys = None if blocked_keys is None else blocked_keys[blocked_keys < panel.width]
        logits = self.panel_logits()
        shift = logits.amax(dim=2)
        self.dead = shift == NEG_INF
        self.alive = ~self.dead
        self.alive_pairs = int(self.alive.sum())
        self.exps = floored_exp_(logits.sub_(shift.masked_fill(self.dead, 0.0)[:, :, None, :]))
        self.shift = shift

    def logits(self, queries: torch.Tensor, rows: torch.Tensor, heads: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """scale * q k^T for ``queries`` [g', blocks', R, d] of the sequence rows ``rows``
        (flattened [blocks' * R]) and the keys of ``heads``: [g', blocks', R, width], -inf where
        the causal mask, the key mask or padding (rows past the sequence) forbids."""
        g, blocks = queries.shape[:2]
        with exact_products(self.bf16_values):
            logits = torch.matmul(queries.reshape(g, blocks * ROW_BLOCK, -1), self.keys[heads].transpose(1, 2))
        keys = torch.arange(self.panel.width)
        forbidden = (keys[None, :] > rows[:, None]) | (rows[:, None] >= self.panel.start + self.panel.rows)
        logits.mul_(self.scale).masked_fill_(forbidden, NEG_INF)
        if self.blocked_keys is not None:
            logits.index_fill_(-1, self.blocked_keys, NEG_INF)
        return logits.view(g, blocks, ROW_BLOCK, -1)

    def panel_logits(self) -> torch.Tensor:
        """The logits of every row of the panel: [g, blocks, R, width]."""
        panel = self.panel
        return self.logits(self.queries, torch.arange(panel.start, panel.start + panel.blocks * ROW_BLOCK))

    def block_logits(self, head: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """The logits of the rows of the (head, block) pairs: [F, R, width]."""
        out = torch.empty(len(head), ROW_BLOCK, self.panel.width)
        for one in head.unique().tolist():  # one matrix product per head
            pick = (head == one).nonzero().flatten()
            rows_of = (block[pick, None] * ROW_BLOCK + self.panel.start + torch.arange(ROW_BLOCK)).flatten()
            out[pick] = self.logits(self.queries[one, block[pick]][None], rows_of, slice(one, one + 1))[0]
        return out

    def row_log_normalisers(self) -> torch.Tensor:
        """lse_i [g, blocks * R] of the panel's rows (+inf for rows that see nothing, so that
        a_i = log p_i - lse_i is -inf there)."""
        heads, blocks = self.shift.shape[:2]
        top = self.shift.amax(dim=-1, keepdim=True).clamp_(min=-1e30)
        weights = (self.shift - top).exp_()  # 0 where dead
        sums = torch.bmm(self.exps.view(heads * blocks, ROW_BLOCK, -1), weights.view(heads * blocks, -1, 1))
        sums = sums.view(heads, blocks, ROW_BLOCK)
        lse = torch.log(sums).add_(top)
        low = (sums < TRUSTED_ROW_SUM).any(dim=-1).nonzero()  # (head, block) pairs with an untrusted row
        if len(low):
            lse[low[:, 0], low[:, 1]] = torch.logsumexp(self.block_logits(low[:, 0], low[:, 1]), dim=-1)
        lse = lse.view(heads, -1)
        return lse.masked_fill_(lse == NEG_INF, float("inf"))

    def block_sums(self, weights: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T [g, blocks, width] = log sum_{i in block} exp(a_i + scale * L_ij) for weights
        exp(a_i - top_b) [g, blocks, R] and top [g, blocks]; and which of these sums are too small
        to trust [g, blocks, width]."""
        heads, blocks = top.shape
        sums = torch.bmm(weights.reshape(heads * blocks, 1, ROW_BLOCK), self.exps.view(heads * blocks, ROW_BLOCK, -1))
        sums = sums.view(heads, blocks, -1)
        untrusted = (sums < TRUSTED_SUM).logical_and_(self.alive)
        totals = torch.log(sums).add_(self.shift).add_(top[:, :, None])
        return totals, untrusted

    def upper_bounds(self, weights: torch.Tensor, top: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """What the block sums at ``where`` [F, 3] may be at most, given float32's floors."""
        head, block, key = where.unbind(1)
        sums = (weights[head, block] * self.exps[head, block, :, key]).sum(-1)
        return top[head, block] + self.shift[head, block, key] + torch.log(sums + ROW_BLOCK * FLOOR_TERM)

    def dense_block_sums(self, a: torch.Tensor) -> torch.Tensor:
        """Every block sum of the panel in log space, a [g, blocks, R]: [g, blocks, width]."""
        terms = self.panel_logits().add_(a[..., None])
        top = terms.amax(dim=2)
        silent = top == NEG_INF  # dead, or rows that all weigh nothing
        top.masked_fill_(silent, 0.0)
        sums = floored_exp_(terms.sub_(top[:, :, None, :])).sum(dim=2)
        return sums.log_().add_(top).masked_fill_(silent, NEG_INF)

    def exact_block_sums(self, a: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """log sum_{i in block} exp(a_i + scale * L_ij) in log space at ``where`` [F, 3], a [g, blocks, R]."""
        pairs, index = where[:, :2].unique(dim=0, return_inverse=True)
        logits = self.block_logits(pairs[:, 0], pairs[:, 1])  # [pairs, R, width]
        head, block, key = where.unbind(1)
        return torch.logsumexp(a[head, block] + logits[index, :, key], dim=-1)


class HeadGroupPageRank:
    """The PageRank steps of g query heads q [g, n, d] with their keys k [g, n, d], over resident
    panels (``bf16_values``: q and k hold bfloat16 values, see :func:`exact_products`)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, scale: float,
                 panel_rows: int = PANEL_ROWS, bf16_values: bool = False):
        heads, n, dim = q.shape
        self.n = n
        self.layout = panels(n, panel_rows)
        padded = sum(panel.blocks for panel in self.layout) * ROW_BLOCK
        if padded > n:
            q = torch.cat([q, q.new_zeros(heads, padded - n, dim)], dim=1)
        blocked = None if bool(key_mask.all()) else (~key_mask).nonzero().flatten()
        self.matrices = []
        for panel in self.layout:
            rows = q[:, panel.start:panel.start + panel.blocks * ROW_BLOCK]
            self.matrices.append(PanelMatrix(rows, k, panel, scale, blocked, bf16_values))
        self.lse = torch.cat([matrix.row_log_normalisers() for matrix in self.matrices], dim=1)  # [g, padded]

    def step(self, log_p: torch.Tensor) -> torch.Tensor:
        """log p_{t+1} [g, n] from log p_t [g, n]."""
        heads, n = log_p.shape
        a = torch.full_like(self.lse, NEG_INF)
        torch.sub(log_p, self.lse[:, :n], out=a[:, :n])
        a = a.view(heads, -1, ROW_BLOCK)
        top = a.amax(dim=-1).clamp_(min=-1e30)  # [g, all blocks]; a block of -inf rows weighs nothing
        weights = (a - top[:, :, None]).exp_()
        parts = []
        first = 0
        for matrix in self.matrices:
            blocks = slice(first, first + matrix.panel.blocks)
            first += matrix.panel.blocks
            totals, untrusted = matrix.block_sums(weights[:, blocks], top[:, blocks])
            parts.append((matrix, blocks, totals, untrusted))
        if any(bool(untrusted.any()) for *_, untrusted in parts):
            self.repair(parts, a, weights, top)
        return self.combine([(matrix, totals) for matrix, _, totals, _ in parts])

    def repair(self, parts, a: torch.Tensor, weights: torch.Tensor, top: torch.Tensor) -> None:
        """Replace the untrusted block sums by exact ones where they may matter. A panel where more
        than :data:`DENSE_REPAIR_SHARE` of the sums are untrusted (sharp attention) is redone whole
        in log space; elsewhere each untrusted sum is recomputed unless its upper bound stays
        :data:`NEGLIGIBLE` nats below the column's trusted total."""
        scattered = []
        for matrix, blocks, totals, untrusted in parts:
            where = untrusted.nonzero()
            if len(where) > DENSE_REPAIR_SHARE * matrix.alive_pairs:
                totals.copy_(matrix.dense_block_sums(a[:, blocks]))
            elif len(where):
                totals[tuple(where.T)] = NEG_INF
                scattered.append((matrix, blocks, totals, where))
        if not scattered:
            return
        trusted = self.combine([(matrix, totals) for matrix, _, totals, _ in parts])
        for matrix, blocks, totals, where in scattered:
            bound = matrix.upper_bounds(weights[:, blocks], top[:, blocks], where)
            needed = where[bound > trusted[where[:, 0], where[:, 2]] - NEGLIGIBLE]
            if len(needed):
                totals[tuple(needed.T)] = matrix.exact_block_sums(a[:, blocks], needed)

    def combine(self, parts) -> torch.Tensor:
        """logsumexp over every panel's blocks: [g, n] (-inf where no block contributes)."""
        heads = parts[0][1].shape[0]
        top = torch.full((heads, self.n), NEG_INF)
        for matrix, totals in parts:
            width = matrix.panel.width
            torch.maximum(top[:, :width], totals.amax(dim=1), out=top[:, :width])
        none = top == NEG_INF
        top.clamp_(min=-1e30)
        sums = torch.zeros(heads, self.n)
        for matrix, totals in parts:
            width = matrix.panel.width
            sums[:, :width] += floored_exp_(totals - top[:, None, :width]).sum(dim=1)
        return sums.log_().add_(top).masked_fill_(none, NEG_INF)


@torch.no_grad()
def pagerank_log_importance_factored(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor,
                                     log_start: torch.Tensor, scale: float, temperature: float = 0.1,
                                     iterations: int = 5, panel_rows: int = PANEL_ROWS,
                                     group_bytes: int = GROUP_BYTES) -> torch.Tensor:
    """Log PageRank importance [B, N] (float32) from the rotated q [B, H, N, d] and k [B, H_kv, N, d]
    of a layer, as :func:`aim_llava.reduction.importance.pagerank_log_importance` computes it."""
    batch, heads, n, _ = q.shape
    key_head = torch.arange(heads) // (heads // k.shape[1])
    group = heads_per_group(n, heads, group_bytes)
    bf16_values = q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16
    log_p = torch.empty(batch, heads, n)
    for sample in range(batch):
        start = log_start[sample].float()
        for first in range(0, heads, group):
            last = min(first + group, heads)
            rank = HeadGroupPageRank(q[sample, first:last].float(), k[sample, key_head[first:last]].float(),
                                     key_mask[sample], scale / temperature, panel_rows, bf16_values)
            group_log_p = start.expand(last - first, n)
            for _ in range(iterations):
                group_log_p = rank.step(group_log_p)
            log_p[sample, first:last] = group_log_p
    return 0.5 * (torch.logsumexp(2 * log_p, dim=1) - math.log(heads))
