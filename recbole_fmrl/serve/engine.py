"""The serving engine: one artifact, batched recommendation, server-side sessions, hot swap. No HTTP.

Every nested size is served from one network pass at the artifact's size: the first m dims of a
nested model's hidden state and item table *are* the size-m model's. ``run_batch`` therefore encodes
all histories of a batch, runs the network once per context, and scores each group of queries that
share a funnel with one GEMM. Everything here runs in one worker thread (``app.py``); ``reload`` may
run in another: it builds the new ``Recommender`` first and swaps one reference, so a batch that
started on the old artifact finishes on it.
"""
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from recbole_fmrl.deploy import funnel as funnels
from recbole_fmrl.deploy import streaming
from recbole_fmrl.deploy.recommender import Recommender
from recbole_fmrl.errors import InputError


class RequestError(InputError):
    """A request the server refuses (HTTP 4xx); ``field`` names the offending part of the body."""

    def __init__(self, field_name, message, status=400):
        super().__init__(message)
        self.field, self.status = field_name, status


@dataclass(frozen=True)
class Query:
    """One recommendation request: raw-id histories (oldest first) and how to rank for them."""

    histories: tuple
    k: int = 10
    size: Optional[int] = None
    funnel: Optional[str] = None
    exclude_seen: bool = False
    skip_unknown: bool = False
    context: str = "window"


@dataclass
class Session:
    context: str
    history: List[int] = field(default_factory=list)  # internal ids, oldest first
    state: object = None  # streaming.StreamState of the generation below
    generation: int = -1
    last_used: float = 0.0


def field_of(err):
    """Which request field an engine error is about (the message says why)."""
    text = str(err)
    for prefix, name in (("topk=", "k"), ("size ", "size"), ("funnel ", "funnel"), ("context ", "context")):
        if text.startswith(prefix):
            return name
    return "history"


class Engine:
    def __init__(self, folder, size=None, funnel=None, max_sessions=10_000, session_ttl=3600.0, clock=time.monotonic):
        self.size, self.funnel, self.clock = size, funnel, clock
        self.max_sessions, self.session_ttl = max_sessions, session_ttl
        self.sessions = OrderedDict()  # id -> Session, least recently used first
        self.evictions = 0
        self.generation = 0
        self.reload_lock = threading.Lock()
        self.rec, self.folder = self.load(folder), str(folder)

    # -- the artifact -------------------------------------------------------------------------
    def load(self, folder):
        rec = Recommender.load(folder, self.size)  # every listed file sha256-checked
        if self.funnel:
            rec.stages(self.funnel, 1)  # a default funnel the artifact cannot run is refused at start
        return rec

    def reload(self, folder=None):
        """Load ``folder`` (default: the current one) and swap it in; a damaged artifact raises, the old serves on."""
        with self.reload_lock:
            folder = str(folder or self.folder)
            rec = self.load(folder)
            self.rec, self.folder, self.generation = rec, folder, self.generation + 1
            return self.info()

    def info(self):
        rec = self.rec
        return {"artifact": self.folder, "generation": self.generation, "size": rec.size, "sizes": list(rec.net.sizes),
                "items": len(rec.item_ids) - 1, "window": rec.window, "funnel": self.funnel,
                "sessions": len(self.sessions), "manifest": rec.manifest}

    # -- batched recommendation ---------------------------------------------------------------
    def run_batch(self, queries):
        """Results (a list of dicts) or a ``RequestError`` per query; one bad query fails only itself."""
        rec = self.rec
        out, plans = [None] * len(queries), {}
        for qi, q in enumerate(queries):
            try:
                plans[qi] = self.plan(rec, q)
            except InputError as err:
                out[qi] = err if isinstance(err, RequestError) else RequestError(field_of(err), str(err))
        hidden = self.hidden_rows(rec, queries, plans)
        groups = {}
        for qi, (stages, _, _) in plans.items():
            groups.setdefault(tuple(stages), []).append(qi)
        for stages, members in groups.items():
            self.score_group(rec, queries, plans, hidden, list(stages), members, out)
        return out

    def plan(self, rec, q):
        """(stages, internal-id histories, skipped counts) of a query, or a RequestError naming the field."""
        if not q.histories:
            raise RequestError("histories", "no history given: send 'history' (one) or 'histories' (a list)")
        streaming.check_context(q.context)
        stages = rec.stages(q.funnel if q.funnel is not None else self.funnel, q.k, q.size)
        encoded = [rec.encode(h, q.skip_unknown) for h in q.histories]
        for row, (ids, _) in enumerate(encoded):
            if not ids:
                name = "history" if len(q.histories) == 1 else f"histories[{row}]"
                raise RequestError(name, f"{name} is empty (no known item): nothing to recommend from")
        return stages, [ids for ids, _ in encoded], [skipped for _, skipped in encoded]

    @staticmethod
    def hidden_rows(rec, queries, plans):
        """{(query, row): hidden [M]}: one network pass per context over every history of the batch."""
        hidden = {}
        for context in {queries[qi].context for qi in plans}:
            keys = [(qi, r) for qi in plans if queries[qi].context == context for r in range(len(plans[qi][1]))]
            states = rec.hidden([plans[qi][1][r] for qi, r in keys], context)  # [B M]
            hidden.update({key: states[i] for i, key in enumerate(keys)})
        return hidden

    @staticmethod
    def score_group(rec, queries, plans, hidden, stages, members, out):
        """Queries sharing a funnel: one top-k over all their rows at the largest k, each cut to its own."""
        rows = [(qi, r) for qi in members for r in range(len(plans[qi][1]))]
        states = torch.stack([hidden[key] for key in rows])
        excluded = torch.zeros(len(rows), len(rec.item_ids), dtype=torch.bool)
        excluded[:, 0] = True
        for i, (qi, r) in enumerate(rows):
            if queries[qi].exclude_seen:
                excluded[i, plans[qi][1][r]] = True
        k = max(queries[qi].k for qi in members)
        ids, scores = funnels.funnel_topk(states, rec.net.item_table(), stages, k, excluded, rec.index_for(stages))
        results = {}
        for i, (qi, r) in enumerate(rows):
            kq = queries[qi].k
            results.setdefault(qi, []).append(rec.describe(ids[i, :kq].tolist(), scores[i, :kq].tolist(), plans[qi][2][r]))
        for qi, found in results.items():
            out[qi] = found

    # -- sessions -----------------------------------------------------------------------------
    def session_events(self, sid, events, k=10, size=None, exclude_seen=False, skip_unknown=False, context=None):
        """Append raw-id events to session ``sid`` (created on first use) and recommend from its state."""
        rec = self.rec
        stages = self.checked(lambda: rec.stages(self.funnel, k, size))
        ids, skipped = self.checked(lambda: rec.encode(events, skip_unknown))
        session = self.open_session(sid, context or "full")
        if context is not None and context != session.context:
            raise RequestError("context", f"session {sid!r} runs context {session.context!r}; delete it to change")
        if session.generation != self.generation or session.state is None:  # new session, or a hot swap: replay
            session.state, session.generation = self.replay(rec, session), self.generation
        for item in ids:
            session.state, _ = streaming.step(rec.net, session.state, item, rec.window)
            session.history.append(item)
        if session.state.hidden is None:
            self.sessions.pop(sid, None)  # opened by this call with nothing in it: not kept
            raise RequestError("events", f"session {sid!r} has no known event yet: nothing to recommend from")
        excluded = torch.zeros(1, len(rec.item_ids), dtype=torch.bool)
        excluded[0, 0] = True
        if exclude_seen:
            excluded[0, session.history] = True
        top_ids, top_scores = funnels.funnel_topk(session.state.hidden, rec.net.item_table(), stages, k, excluded,
                                                  rec.index_for(stages))
        result = rec.describe(top_ids[0].tolist(), top_scores[0].tolist(), skipped)
        return {"session": sid, "events": len(session.history), "context": session.context, **result}

    @staticmethod
    def checked(call):
        try:
            return call()
        except RequestError:
            raise
        except InputError as err:
            raise RequestError("events" if field_of(err) == "history" else field_of(err), str(err)) from None

    @staticmethod
    def replay(rec, session):
        state = streaming.init_state(rec.net, session.context)
        for item in session.history:
            state, _ = streaming.step(rec.net, state, item, rec.window)
        return state

    def open_session(self, sid, context):
        now = self.clock()
        self.expire(now)
        if sid not in self.sessions:
            if len(self.sessions) >= self.max_sessions:
                raise RequestError("session", f"{len(self.sessions)} open sessions, the server's limit "
                                   f"(--max-sessions {self.max_sessions}); delete one or wait for idle ones to expire "
                                   f"({self.session_ttl:g} s)", status=429)
            self.sessions[sid] = Session(streaming.check_context(context))
        session = self.sessions[sid]
        session.last_used = now
        self.sessions.move_to_end(sid)
        return session

    def expire(self, now):
        """Evict sessions idle for longer than the TTL (oldest first; counted)."""
        while self.sessions:
            sid, session = next(iter(self.sessions.items()))
            if now - session.last_used <= self.session_ttl:
                return
            del self.sessions[sid]
            self.evictions += 1

    def delete_session(self, sid):
        if self.sessions.pop(sid, None) is None:
            raise RequestError("session", f"no open session {sid!r}", status=404)
