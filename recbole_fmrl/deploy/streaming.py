"""Streaming inference: one event at a time through the LRU's recurrent form.

A user's state is one complex vector (as a real pair) per LRU layer; an event costs one
position-wise pass, O(layers x m^2) arithmetic with O(layers x m) state, however long the history.

Past MAX_ITEM_LIST_LENGTH (W) events, two contexts are possible (``context=``):
- ``"full"`` (default): the full recurrence; every past event stays in the state, fading as
  |lambda|^age. Equals the parallel forward over the whole, untruncated history.
- ``"window"``: what training and evaluation saw: the last W events only. The first W events
  run the recurrence; after that each event re-runs the W-event window in parallel (O(W) per event),
  because a multi-layer LRU's states over a sliding window cannot be updated in O(1).
"""
from dataclasses import dataclass, field

import torch

from recbole_fmrl.errors import InputError

CONTEXTS = ("full", "window")


@dataclass(frozen=True)
class StreamState:
    """Immutable per-user state; ``step`` returns a new one."""

    context: str
    states: torch.Tensor  # [layers 1 2S] real | imaginary LRU states
    hidden: torch.Tensor = None  # [1 m] the last event's output, None before any event
    recent: tuple = field(default_factory=tuple)  # last W internal ids (window context)
    events: int = 0


def check_context(context):
    if context not in CONTEXTS:
        raise InputError(f"context {context!r}: expected one of {CONTEXTS}")
    return context


def init_state(net, context="full"):
    layers = len(net.blocks)
    states = net.item_table().new_zeros(layers, 1, net.state_size())
    return StreamState(check_context(context), states)


@torch.no_grad()
def step(net, state, item, window):
    """Advance ``state`` by one internal item id; returns (new state, hidden [1 m])."""
    recent = (state.recent + (item,))[-window:] if state.context == "window" else ()
    if state.context == "window" and state.events >= window:  # the window slides: re-run it
        device = net.item_table().device
        seq = torch.tensor([recent], dtype=torch.long, device=device)
        hidden = net.infer(seq, torch.tensor([len(recent)], device=device))
        return StreamState(state.context, state.states, hidden, recent, state.events + 1), hidden
    hidden, states = net.step(state.states, item)
    return StreamState(state.context, states, hidden, recent, state.events + 1), hidden


@torch.no_grad()
def run_recurrent(net, items, lengths):
    """Last hidden state [B m] of right-padded histories [B L] by the recurrence (any length)."""
    batch = items.shape[0]
    table = net.item_table()
    states = table.new_zeros(len(net.blocks), batch, net.state_size())
    hidden = table.new_zeros(batch, net.args.hidden_size)
    for t in range(items.shape[1]):
        out, new = net.step(states, items[:, t])
        live = (t < lengths)[:, None]
        states = torch.where(live, new, states)
        hidden = torch.where((t == lengths - 1)[:, None], out, hidden)
    return hidden
