"""The DRAM planner: which weights stay resident and which stream every token.

Every weight group is a candidate for residence, with the bytes per token it costs
when it is not resident: each layer's attention (read whole every token), the LM head
(whole, every token, in vocabulary chunks), an untied embedding table (one row per
token), each FFN neuron (its probability of being selected x its bundle bytes). What
no plan can stream is fixed: the KV cache of the context it allows, decoding's working
memory and one prefill step's activations, the readers' buffers and one layer's
neurons in flight, the tensors too small to stream (norms, biases), the selector's
state, and the runtime. The plan keeps resident what saves the most bytes per token
per byte of DRAM (greedy by that ratio; ties go to the groups, then to the earlier
layer, so that with `all` whole layers are cached and compute with no gather) and
streams the rest through the reader.

A pure function of sizes: `plan_residency` knows nothing of models or files.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import FlashError

MiB = 2**20
# the fixed part for one prefill step's activations (`budget.prefill_bytes`)
PREFILL = "prefill step"


@dataclass(frozen=True)
class Group:
    """Weights held whole or streamed whole every token (a layer's attention, the LM
    head, an untied embedding table).

    Args:
        name: what the plan prints ("layers.3.self_attn", "lm_head").
        resident: DRAM bytes when held (in the compute dtype).
        streamed: bytes read per decoded token when not held.
        staging: the largest read of one pass (the reader's buffer holds it).
        in_flight: DRAM that one streamed pass holds beside the staging buffer.
    """

    name: str
    resident: int
    streamed: int
    staging: int
    in_flight: int


@dataclass(frozen=True)
class Neurons:
    """One layer's FFN neurons, held one by one in the layer's cache.

    Args:
        resident: DRAM bytes of one cached neuron (decoded).
        streamed: bytes one neuron costs each time it is read.
        use: (count,) each neuron's probability of being selected by a token, in the
            order the cache takes them (a profile's most frequent first).
    """

    resident: int
    streamed: int
    use: np.ndarray

    @property
    def count(self) -> int:
        return len(self.use)


@dataclass
class Plan:
    """Where every byte of the budget goes; `model.flash_plan`."""

    budget: Optional[int]
    fixed: Dict[str, int]  # held whatever the budget, by what they are
    groups: List[Group]
    held: List[bool]  # per group: resident (True) or streamed
    layers: List[Neurons]
    capacities: List[int]  # cache slots per layer (the first `capacity` of `use`)
    streaming: int = 0  # the dense stream's staging buffers and one pass in flight
    expected_bytes: Optional[int] = None  # read per token once warm; None: unknown
    pinned: List[int] = field(default_factory=list)  # per layer: the hot part's slots
    prefill_step: int = 2048  # tokens a prompt is processed in at a time, at most
    # `fixed` at the least budget (the smallest prefill step), or None: `fixed`
    least_fixed: Optional[Dict[str, int]] = None
    # what the process holds beside the plan, measured at load (`load` fills it):
    # the interpreter with MLX, numpy and mlx-lm imported, and the tokenizer
    outside: Dict[str, int] = field(default_factory=dict)
    # the input selector's: `layers` from here on are input channels (their gate/up
    # columns), one entry per decoder layer after the down rows' entries
    channels_from: Optional[int] = None

    @property
    def caches(self) -> int:
        return sum(c * n.resident for c, n in zip(self.capacities, self.layers))

    @property
    def resident_groups(self) -> int:
        return sum(g.resident for g, h in zip(self.groups, self.held) if h)

    @property
    def total(self) -> int:
        return (
            sum(self.fixed.values())
            + self.resident_groups
            + self.streaming
            + self.caches
        )

    @property
    def capacity(self) -> int:
        """The smallest layer cache (all layers have the same unless the plan fills
        whole layers first)."""
        return min(self.capacities, default=0)

    @property
    def neuron_bytes(self) -> int:
        """One cached neuron of every layer, decoded."""
        return sum(n.resident for n in self.layers)

    @property
    def floor(self) -> int:
        """The least budget that runs this model with these options."""
        return least_budget(self.least_fixed or self.fixed, self.groups)

    def budget_for_slots(self, slots: int) -> int:
        """The budget whose plan holds every group read through the stream buffers
        and `slots` cache slots in every layer (with a selector that spreads its
        caches evenly; a table read by rows stays on disk), at this plan's prefill
        step: load with the same `prefill_step_size` (a budget's own step may be
        smaller, leaving room for more slots)."""
        held = sum(g.resident for g in self.groups if g.staging)
        return sum(self.fixed.values()) + held + slots * self.neuron_bytes

    def streamed(self) -> List[Group]:
        return [g for g, h in zip(self.groups, self.held) if not h]

    def describe(self) -> str:
        mb = lambda n: f"{n / MiB:.1f} MiB"  # noqa: E731
        budget = "no budget" if self.budget is None else f"budget {mb(self.budget)}"
        fixed = " + ".join(
            f"{k} of {self.prefill_step} tokens {mb(v)}"
            if k == PREFILL
            else f"{k} {mb(v)}"
            for k, v in self.fixed.items()
            if v
        )
        streamed = self.streamed()
        cut = len(self.layers) if self.channels_from is None else self.channels_from
        cached = sum(self.capacities[:cut])
        neurons = sum(n.count for n in self.layers[:cut])
        whole = sum(c == n.count for c, n in zip(self.capacities, self.layers[:cut]))
        held = f"resident {len(self.groups) - len(streamed)}/{len(self.groups)} groups "
        held += f"({mb(self.resident_groups)})"
        if streamed:
            names = ", ".join(g.name for g in streamed[:4])
            more = f", +{len(streamed) - 4} more" if len(streamed) > 4 else ""
            held += (
                f"; streamed every token: {names}{more} (buffers {mb(self.streaming)})"
            )
        pinned = f", {sum(self.pinned)} of them pinned hot" if sum(self.pinned) else ""
        outside = ""
        if self.outside:
            parts = " + ".join(f"{k} {mb(v)}" for k, v in self.outside.items())
            outside = f"; beside it, measured at load: {parts}"
        channels = ""
        if self.channels_from is not None:
            kept = sum(self.capacities[cut:])
            channels = f", {kept}/{sum(n.count for n in self.layers[cut:])} channels"
        return (
            f"[mlx_flash] DRAM plan ({budget}): {fixed}; {held}; neuron caches "
            f"{mb(self.caches)} ({cached}/{neurons} neurons{channels}, {whole}/{cut} "
            f"layers whole{pinned}) = {mb(self.total)}; expected read per token: "
            f"{self.expected()}{outside}"
        )

    def expected(self) -> str:
        if self.expected_bytes is None:
            return "depends on the selections"
        return f"{self.expected_bytes / 1e6:.2f} MB"

    def estimate(self) -> float:
        """Bytes per token the plan expects to read, from the groups it streams and
        the neurons' `use` beyond each cache (the planner's own objective)."""
        groups = sum(g.streamed for g in self.streamed())
        neurons = sum(
            float(n.use[c:].sum()) * n.streamed
            for c, n in zip(self.capacities, self.layers)
        )
        return groups + neurons


def floor_bytes(fixed: Dict[str, int], groups: Sequence[Group]) -> int:
    """The least budget that runs: everything fixed, no neuron cached, every group
    streamed (with its buffers). (Holding every group may cost less still, for a
    model whose groups are smaller than the buffers: `plan_residency` takes both.)"""
    return sum(fixed.values()) + streaming_bytes(groups)


def least_budget(fixed: Dict[str, int], groups: Sequence[Group]) -> int:
    """The floor: every group streamed (`floor_bytes`), or every group that needs
    the stream buffers held instead, whichever is less."""
    held = sum(g.resident for g in groups if g.staging)
    return min(floor_bytes(fixed, groups), sum(fixed.values()) + held)


def streaming_bytes(groups: Sequence[Group]) -> int:
    """The dense stream's two staging buffers (each holds its largest read: a pass
    computes from one while the next is read into the other) and one pass in
    flight."""
    if not groups:
        return 0
    return 2 * max(g.staging for g in groups) + max(g.in_flight for g in groups)


def plan_residency(
    budget: Optional[int],
    fixed: Dict[str, int],
    groups: Sequence[Group],
    layers: Sequence[Neurons],
    even: bool = False,
    where: Optional[Path] = None,
) -> Plan:
    """Decide what is resident under `budget` (bytes, or None: everything).

    Args:
        fixed: bytes held whatever the plan, by name.
        groups: weights held or streamed whole.
        layers: each layer's neurons.
        even: give every layer the same number of cache slots (a selector with no
            profile: every neuron as likely as any other, and an LRU needs slots in
            every layer to hit).
        where: the store, named by the error.

    Raises:
        FlashError: `budget` below the floor (`Plan.floor`).
    """
    groups, layers = list(groups), list(layers)
    everything = sum(fixed.values()) + sum(g.resident for g in groups)
    everything += sum(n.count * n.resident for n in layers)
    start = Plan(
        budget,
        dict(fixed),
        groups,
        [True] * len(groups),
        layers,
        [n.count for n in layers],
    )
    if budget is None or everything <= budget:
        return start
    # Ways to spend it, the one that reads least wins (each reads less as the budget
    # grows, so their minimum does too): with no stream buffers (every group held
    # that needs them) or with them; with neuron caches or none (the groups first, as
    # naive would)
    tries = []
    for neurons in (True, False):
        base = Plan(
            budget, dict(fixed), groups, [True] * len(groups), layers, [0] * len(layers)
        )
        buffered = [g.staging > 0 for g in groups]
        held = sum(fixed.values()) + sum(
            g.resident for g, b in zip(groups, buffered) if b
        )
        floor = floor_bytes(fixed, groups)
        how = {"even": even, "neurons": neurons}
        if held <= budget:
            tries += _with_each_group(base, budget - held, buffered, streaming=0, **how)
        if floor <= budget:
            streaming = streaming_bytes(groups)
            none = [False] * len(groups)
            tries += _with_each_group(
                base, budget - floor, none, streaming=streaming, **how
            )
    if not tries:
        raise budget_error(budget, least_budget(fixed, groups), fixed, groups, where)
    return min(tries, key=Plan.estimate)


def _with_each_group(start: Plan, room: int, held: List[bool], **how) -> List[Plan]:
    """The greedy (`how`: its `streaming`, `even` and `neurons`), and the greedy after
    holding first each group it left out (a large group can be worth more than the
    smaller ones the greedy took in its place: Qwen2.5-Coder-0.5B's LM head at half
    the file)."""
    first = _greedy(start, room, held, **how)
    tries = [first]
    for j, g in enumerate(start.groups):
        if not first.held[j] and g.resident <= room:
            forced = list(held)
            forced[j] = True
            tries.append(_greedy(start, room - g.resident, forced, **how))
    return tries


def _greedy(
    start: Plan,
    room: int,
    held: List[bool],
    streaming: int,
    even: bool,
    neurons: bool = True,
) -> Plan:
    """`start` with `held` groups, spending `room` bytes by savings per byte (on
    groups only, without `neurons`)."""
    groups, layers = start.groups, start.layers
    plan = Plan(
        start.budget,
        dict(start.fixed),
        groups,
        list(held),
        layers,
        [0] * len(layers),
        streaming,
    )
    rounds = True  # even caches grow slot by slot: none after one that did not fit
    for kind, index, count, cost in _by_savings(groups, layers, even):
        if kind == "group" and plan.held[index] or kind == "round" and not rounds:
            continue
        if kind != "group" and not neurons:
            continue
        take = min(count, room // cost) if cost else count
        if take == 0:
            rounds = rounds and kind != "round"
            continue
        room -= take * cost
        if kind == "group":
            plan.held[index] = True
        elif kind == "round":  # slot `index` of every layer that has one
            for i, n in enumerate(layers):
                plan.capacities[i] = min(n.count, index + 1)
        else:
            plan.capacities[index] += take
    if all(h or g.staging == 0 for g, h in zip(groups, plan.held)):
        plan.streaming = 0  # nothing streams through the buffers
    return plan


def _by_savings(groups: List[Group], layers: List[Neurons], even: bool):
    """(kind, index, count, cost of one) in the order the greedy takes them: the most
    bytes saved per token per byte of DRAM first."""
    items = []  # (-ratio, rank, index, position, kind, count, cost)
    for i, g in enumerate(groups):
        items.append(
            (-g.streamed / max(g.resident, 1), 0, i, 0, "group", 1, g.resident)
        )
    if even:
        deepest, best = max((n.count for n in layers), default=0), np.inf
        for k in range(deepest):  # slot k of every layer deep enough, in order
            having = [n for n in layers if n.count > k]
            cost = sum(n.resident for n in having)
            saved = sum(float(n.use[k]) * n.streamed for n in having)
            best = min(best, saved / max(cost, 1))  # never before slot k - 1
            items.append((-best, 1, k, k, "round", 1, cost))
    else:
        for i, n in enumerate(layers):
            use = np.asarray(n.use, np.float64)
            # runs of equal use (all of a layer with `all`) are taken as one item
            edges = np.flatnonzero(np.diff(use)) + 1
            for start, stop in zip([0, *edges], [*edges, len(use)]):
                ratio = use[start] * n.streamed / max(n.resident, 1)
                items.append(
                    (-ratio, 1, i, int(start), "neurons", int(stop - start), n.resident)
                )
    items.sort(key=lambda t: t[:4])
    for _, _, index, _, kind, count, cost in items:
        yield kind, index, count, cost


def budget_error(
    budget: int,
    floor: int,
    fixed: Dict[str, int],
    groups: Sequence[Group],
    where: Optional[Path] = None,
) -> FlashError:
    parts = ", ".join(f"{k} {v / MiB:.1f}" for k, v in fixed.items() if v)
    return FlashError(
        f"a DRAM budget of {budget / MiB:.1f} MiB is below this model's floor of "
        f"{floor / MiB:.1f} MiB ({parts}, streaming buffers "
        f"{streaming_bytes(groups) / MiB:.1f} MiB; in MiB)",
        where,
        fix=f"give --dram-budget of at least {-(-floor // MiB)} MiB "
        "(or a shorter --max-kv-size: the KV cache is part of the floor)",
    )
