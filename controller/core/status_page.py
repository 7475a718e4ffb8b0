"""The status page: one plain status dict in, server-rendered HTML out. Pure: no I/O, no clock.

The dict is what `/api/status` serves (built by `controller.effects.status_api.collect`):

    cluster      the cluster's name
    generated    when the dict was built (epoch seconds)
    spec         {path, hash}
    nodes        name → the node as `homelab status --json` shows it (reachable, error, containers with planned
                 and actual VRAM, foreign_containers, ollama), plus tier, state (HEALTHY / DEGRADED / DOWN /
                 ASLEEP / NOT OBSERVED), reasons (one line each), ram_bytes, gpus, cpu_models, cpu_pools and
                 power (below)
      gpus       [{index, name, vram_bytes, reserve_bytes, foreign_bytes, shortfall_bytes, capacity_bytes,
                   planned_bytes, used_bytes, models: [{model, replica, container, gpu_layers, layers,
                   planned_bytes, actual_bytes, over_plan}], pools: [pool]}]
      cpu_models [{model, replica, runtime, ram_bytes, status}] (pinned models; on-demand ones are in cpu_pools)
      cpu_pools  [pool]: the node's swap pools in RAM (gpu None)
      pool       a swap pool of on-demand models: {pool (its key, NODE-gpuI or NODE-cpu), runtime, container
                 (the router's, when it runs), max_loaded, loaded (how many now), members: [{model, state,
                 since}], planned_bytes (VRAM reserved), ram_bytes, actual_bytes, over_plan, error (why the
                 members' states are unknown, or None)}; a member's state is loaded, loading, sleeping or
                 unloaded (both idle: it loads on request), failed, or unknown; since: epoch seconds it has
                 been loaded or asleep, when known
      power      None for a node without a `power` section (always on); else {state (awake / asleep / waking),
                 since (asleep or waking since, epoch seconds), reason, sleep_after (seconds), idle_s and
                 last_use (from a running `homelab watch`'s last look, epoch seconds, when it has one),
                 checked (when that look was)}
    health       `HealthReport.to_json()` (verdict, reason, tiers → verdict and endpoints), or None
    placement    {status, unplaced: [{model, replica, reason}], notes}
    routing      [{category, chain: [{category, models: [{model, state, why}]}], answer, reason}]
    watch        STATE_DIR/watch.json as a running `homelab watch` wrote it, or None
    events       the last lines of STATE_DIR/events.jsonl
    warnings     [str]

A GPU is drawn as a bar of its whole VRAM: the reserve, memory held by other processes, each model's
planned share (a colour per model, labelled with its GPU layers), each swap pool's reserved share (labelled
with its max_loaded; its members listed below the bar, each loaded, loading, idle or failed), the free rest;
below it a thin bar of the measured use of each model when nvidia-smi reported it. Every piece of text from the dict is
HTML-escaped (model, node and container names, errors and events come from specs and from the cluster).

The page refreshes itself with a few lines of inline JavaScript from `/api/status?view=html`, which adds
`html` (this module's `render_main`) to the same dict: one renderer, on the server. Without JavaScript the
page is the last render. Nothing is loaded from anywhere else.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

REFRESH_S = 5
"""How often the page asks /api/status again."""
EVENTS_SHOWN = 15

STATE_CLASS = {
    "HEALTHY": "ok",
    "DEGRADED": "warn",
    "DOWN": "bad",
    "ASLEEP": "muted",
    "NOT OBSERVED": "bad",
    "UNKNOWN": "muted",
    # endpoint statuses (health.Status): an idle on-demand model is neither down nor degraded
    "UP": "ok",
    "SLOW": "warn",
    "STARTING": "warn",
    "IDLE": "idle",
    # power states
    "AWAKE": "ok",
    "WAKING": "warn",
}

MEMBER_STATE = {
    "loaded": ("loaded", "ok", ""),
    "loading": ("loading", "warn", ""),
    "sleeping": ("idle", "idle", "asleep after its ttl: loads on request"),
    "unloaded": ("idle", "idle", "not loaded: loads on request"),
    "failed": ("failed", "bad", "its last load failed"),
}
"""A swap-pool member's state (the router's) → the word shown, its class, and what it means."""


def e(value: object) -> str:
    """HTML-escape anything (quotes too: values also go into attributes)."""
    return escape("" if value is None else str(value), quote=True)


def size(n: object) -> str:
    """Bytes as people read them: 1.2 GiB, 410 MiB; '?' when unknown."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "?"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def model_colour(model: str) -> str:
    """A stable colour per model name (the same on every GPU and every render)."""
    hue = zlib.crc32(model.encode()) % 360
    return f"hsl({hue} 62% 48%)"


def when(t: object) -> str:
    if not isinstance(t, int | float) or isinstance(t, bool) or t <= 0:
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, ValueError, OSError):  # inf, 1e300: no date
        return "?"


def duration(seconds: object) -> str:
    """Seconds as people read them: 45 s, 30 min, 2.5 h; '?' when unknown."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "?"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min" if seconds % 60 < 1 else f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def badge(state: object) -> str:
    s = str(state or "UNKNOWN")
    return f'<span class="badge {STATE_CLASS.get(s.upper(), "muted")}">{e(s)}</span>'


def _pct(part: int | float, whole: int | float) -> float:
    return max(0.0, min(100.0, 100.0 * part / whole)) if whole > 0 else 0.0


def _int(v: object) -> int:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0


# --------------------------------------------------------------------------- pieces


def pool_colour(pool: object) -> str:
    return model_colour(f"swap pool {pool}")


def pool_summary(p: Mapping[str, Any]) -> str:
    """`1 of 3 loaded (max 1)`, as `homelab status` says it (escaped)."""
    members = p.get("members") or []
    if p.get("error"):
        return f"members unknown ({e(p.get('error'))}), at most {e(p.get('max_loaded'))} loaded"
    return f"{e(p.get('loaded'))} of {len(members)} loaded (max {e(p.get('max_loaded'))})"


def pool_members(p: Mapping[str, Any]) -> str:
    """Each member of a swap pool with its state now: loaded / loading / idle / failed."""
    items = []
    for m in p.get("members") or []:
        state = str(m.get("state") or "unknown")
        word, cls, meaning = MEMBER_STATE.get(state, (state, "muted", ""))
        since = f" since {when(m.get('since'))}" if isinstance(m.get("since"), int | float) else ""
        items.append(
            f'<li data-model="{e(m.get("model"))}" data-state="{e(state)}"><span class="model-name">'
            f'{e(m.get("model"))}</span> <span class="badge {cls}" title="{e(meaning or state)}">{e(word)}</span>'
            f"{since}{' — ' + e(meaning) if meaning else ''}</li>"
        )
    return f'<ul class="members">{"".join(items)}</ul>'


def pool_item(p: Mapping[str, Any], memory: str) -> str:
    """A swap pool as a legend item: its name, size, how many are loaded, then its members."""
    measured = p.get("actual_bytes")
    beside = f", measured {size(measured)}" if isinstance(measured, int) else ""
    over = ' <span class="badge bad">OVER PLAN</span>' if p.get("over_plan") else ""
    return (
        f'<li class="pool" data-pool="{e(p.get("pool"))}"><span class="swatch" style="background:'
        f'{pool_colour(p.get("pool"))}"></span><span class="pool-name">swap pool {e(p.get("pool"))}</span>'
        f" ({e(p.get('runtime'))}) {memory}{e(beside)}{over}: {pool_summary(p)}{pool_members(p)}</li>"
    )


def gpu_bar(node: str, gpu: Mapping[str, Any]) -> str:
    """One GPU: planned shares on its whole VRAM, and the measured use below when known."""
    total = _int(gpu.get("vram_bytes")) or _int(gpu.get("capacity_bytes")) or 1
    reserve = _int(gpu.get("reserve_bytes"))
    foreign = _int(gpu.get("foreign_bytes")) + _int(gpu.get("shortfall_bytes"))
    models: Sequence[Mapping[str, Any]] = gpu.get("models") or []
    pools: Sequence[Mapping[str, Any]] = gpu.get("pools") or []
    segs: list[str] = []

    def seg(cls: str, nbytes: int, label: str, title: str, style: str = "") -> None:
        if nbytes <= 0:
            return
        w = _pct(nbytes, total)
        segs.append(
            f'<div class="seg {cls}" style="width:{w:.3f}%;{style}" title="{e(title)}">'
            f'<span class="seglabel">{e(label)}</span></div>'
        )

    seg("reserve", reserve, "reserve", f"reserve {size(reserve)}")
    seg("foreign", foreign, "other", f"held by other processes {size(foreign)}")
    for m in models:
        name = str(m.get("model"))
        layers = f"{m.get('gpu_layers')}/{m.get('layers')}"
        planned = _int(m.get("planned_bytes"))
        seg(
            "model",
            planned,
            f"{name} {layers}",
            f"{name}: planned {size(planned)}, GPU layers {layers}",
            f"background:{model_colour(name)}",
        )
    for p in pools:
        planned = _int(p.get("planned_bytes"))
        members = ", ".join(str(m.get("model")) for m in p.get("members") or [])
        seg(
            "model pool",
            planned,
            f"swap pool (max {p.get('max_loaded')})",
            f"swap pool {p.get('pool')}: {members}; planned {size(planned)}, at most {p.get('max_loaded')} loaded",
            f"background-color:{pool_colour(p.get('pool'))}",  # the class's stripes stay: a pool, not a model
        )
    used = reserve + foreign + sum(_int(m.get("planned_bytes")) for m in [*models, *pools])
    seg("free", total - used, "free", f"free {size(total - used)}")

    with_measure = [
        (str(m.get("model")), model_colour(str(m.get("model"))), m)
        for m in models
        if isinstance(m.get("actual_bytes"), int)
    ] + [
        (f"swap pool {p.get('pool')}", pool_colour(p.get("pool")), p)
        for p in pools
        if isinstance(p.get("actual_bytes"), int)
    ]
    actual_bar = ""
    if with_measure:
        parts = "".join(
            f'<div class="seg model{" over" if m.get("over_plan") else ""}"'
            f' style="width:{_pct(_int(m["actual_bytes"]), total):.3f}%;background:{colour}"'
            f' title="{e(label)}: measured {size(m["actual_bytes"])}"></div>'
            for label, colour, m in with_measure
        )
        actual_bar = f'<div class="bar actual" aria-label="measured use">{parts}</div>'

    legend = []
    for m in models:
        name = str(m.get("model"))
        planned = _int(m.get("planned_bytes"))
        measured = m.get("actual_bytes")
        beside = f", measured {size(measured)}" if isinstance(measured, int) else ""
        over = ' <span class="badge bad">OVER PLAN</span>' if m.get("over_plan") else ""
        legend.append(
            f'<li><span class="swatch" style="background:{model_colour(name)}"></span>'
            f'<span class="model-name">{e(name)}</span> {e(m.get("gpu_layers"))}/{e(m.get("layers"))} GPU layers,'
            f" planned {size(planned)}{e(beside)}{over}</li>"
        )
    legend += [pool_item(p, f"planned {size(_int(p.get('planned_bytes')))} VRAM") for p in pools]
    head = (
        f"GPU {e(gpu.get('index'))} {e(gpu.get('name'))}: planned {size(_int(gpu.get('planned_bytes')))}"
        f" of {size(_int(gpu.get('capacity_bytes')))} usable ({size(total)} VRAM)"
    )
    if isinstance(gpu.get("used_bytes"), int):
        head += f", nvidia-smi: {size(gpu['used_bytes'])} in use"
    return (
        f'<div class="gpu" data-node="{e(node)}" data-gpu="{e(gpu.get("index"))}">'
        f'<div class="gpuhead">{head}</div>'
        f'<div class="bar planned" aria-label="planned">{"".join(segs)}</div>{actual_bar}'
        f'<ul class="legend">{"".join(legend) or "<li>nothing planned</li>"}</ul></div>'
    )


def power_line(power: object) -> str:
    """A node's power state: asleep or waking since when and why, or awake; its sleep_after and last use."""
    if not isinstance(power, Mapping):
        return ""
    state = str(power.get("state") or "awake")
    parts = [f"power {badge(state)}"]
    if state != "awake" and isinstance(power.get("since"), int | float):
        parts[0] += f" since {when(power.get('since'))}"
    if power.get("reason"):
        parts[0] += f" ({e(power.get('reason'))})"
    if isinstance(power.get("last_use"), int | float):
        parts.append(f"last used {when(power.get('last_use'))} (idle {duration(power.get('idle_s'))})")
    if power.get("sleep_after") is not None:
        parts.append(f"sleeps after {duration(power.get('sleep_after'))} idle")
    return f'<p class="power" data-power="{e(state)}">{" · ".join(parts)}</p>'


def node_card(name: str, n: Mapping[str, Any]) -> str:
    state = n.get("state") or "UNKNOWN"
    # Asleep on purpose is its own quiet state: what an asleep node cannot answer is drawn grey, never red.
    asleep = str(state).upper() == "ASLEEP"
    down = "muted" if asleep else "bad"
    reasons = "".join(f"<li>{e(r)}</li>" for r in n.get("reasons") or [])
    gpus = "".join(gpu_bar(name, g) for g in n.get("gpus") or [])
    cpu_rows = "".join(
        f'<li><span class="model-name">{e(m.get("model"))}</span> ({e(m.get("runtime"))}) CPU only,'
        f" RAM {size(m.get('ram_bytes'))}{' — ' + e(m.get('status')) if m.get('status') else ''}</li>"
        for m in n.get("cpu_models") or []
    ) + "".join(pool_item(p, f"CPU only, RAM {size(p.get('ram_bytes'))}") for p in n.get("cpu_pools") or [])
    containers = n.get("containers") or []
    rows = "".join(
        f"<tr><td>{e(c.get('name'))}</td><td>{e(c.get('model'))}</td>"
        f'<td class="{"ok" if c.get("status") == "running" else down}">{e(c.get("status"))}</td>'
        f"<td>{e(','.join(map(str, c.get('gpus') or [])) or 'CPU')}</td><td>{e(c.get('port'))}</td>"
        f"<td>{e(c.get('gpu_layers'))}</td><td>{size(c.get('vram_planned_bytes'))}</td>"
        f"<td>{size(c.get('vram_actual_bytes'))}</td></tr>"
        for c in containers
    )
    table = (
        '<table class="containers"><thead><tr><th>container</th><th>model</th><th>status</th><th>GPUs</th>'
        f"<th>port</th><th>ngl</th><th>VRAM planned</th><th>measured</th></tr></thead><tbody>{rows}</tbody></table>"
        if containers
        else ""
    )
    ollama = n.get("ollama")
    olines = ""
    if isinstance(ollama, Mapping):
        if not ollama.get("reachable"):
            olines = f'<p class="{down}">Ollama {e(ollama.get("url"))}: not observed ({e(ollama.get("error"))})</p>'
        else:
            models = ", ".join(
                f"{e(m.get('name'))}{' (loaded)' if m.get('loaded') else ''}" for m in ollama.get("models") or []
            )
            olines = f"<p>Ollama {e(ollama.get('url'))}: {models or 'no homelab models'}</p>"
    ram = f" · RAM {size(n.get('ram_bytes'))}" if n.get("ram_bytes") else ""
    quiet = '"reasons asleep"' if asleep else "reasons"
    return (
        f'<section class="node" id="node-{e(name)}" data-node="{e(name)}" data-state="{e(state)}">'
        f'<h3>{e(name)} <span class="muted">tier {e(n.get("tier"))}{ram}</span> {badge(state)}</h3>'
        f"{power_line(n.get('power'))}"
        f"{f'<ul class={quiet}>{reasons}</ul>' if reasons else ''}{gpus}"
        f"{f'<ul class=cpu>{cpu_rows}</ul>' if cpu_rows else ''}{olines}{table}</section>"
    )


def tiers_section(status: Mapping[str, Any]) -> str:
    health = status.get("health") or {}
    nodes: Mapping[str, Mapping[str, Any]] = status.get("nodes") or {}
    tiers: Mapping[str, Mapping[str, Any]] = health.get("tiers") or {}
    order = list(tiers) + sorted({str(n.get("tier")) for n in nodes.values()} - set(tiers))
    parts = []
    for tier in order:
        t = tiers.get(tier) or {}
        members = [name for name, n in nodes.items() if n.get("tier") == tier]
        endpoints = t.get("endpoints") or []
        # idle (an on-demand model, loads on request) and asleep (on purpose) are not problems
        bad = [p for p in endpoints if p.get("status") not in ("up", "idle", "asleep")]
        why = "".join(f"<li>{e(p.get('name'))}: {e(p.get('error') or p.get('status'))}</li>" for p in bad[:8])
        more = f"<li>… {len(bad) - 8} more</li>" if len(bad) > 8 else ""
        for word, meaning in (("idle", "on demand, loads on request"), ("asleep", "node put to sleep")):
            quiet = [str(p.get("name")) for p in endpoints if p.get("status") == word]
            if quiet:
                more += f'<li class="{STATE_CLASS[word.upper()]}">{badge(word)} {e(", ".join(quiet))} ({meaning})</li>'

        parts.append(
            f'<div class="tier" data-tier="{e(tier)}" data-state="{e(t.get("verdict") or "UNKNOWN")}">'
            f"<h3>{e(tier)} {badge(t.get('verdict'))}</h3>"
            f'<p class="muted">{e(", ".join(members)) or "no nodes"}</p>'
            f"{f'<ul class=reasons>{why}{more}</ul>' if why else ''}</div>"
        )
    verdict = health.get("verdict")
    head = f"<p>Cluster {badge(verdict)} {e(health.get('reason'))}</p>" if health else "<p>health not probed</p>"
    return f'<section id="tiers"><h2>Tiers</h2>{head}<div class="tiers">{"".join(parts)}</div></section>'


def reconcile_section(status: Mapping[str, Any]) -> str:
    w = status.get("watch")
    spec = status.get("spec") or {}
    spec_line = f"<p>spec {e(spec.get('path'))} (hash {e(spec.get('hash'))})</p>" if spec else ""
    if not isinstance(w, Mapping):
        return (
            f'<section id="reconcile"><h2>Last reconcile</h2>{spec_line}'
            "<p class=muted>no <code>homelab watch</code> has written a status in this state directory</p></section>"
        )
    last = w.get("last_run") or {}
    applied = w.get("applied") or {}
    plan = last.get("plan") or {}
    result = '<span class="badge ok">ok</span>' if last.get("ok") else '<span class="badge bad">FAILED</span>'
    if not last:
        result = "not yet"
    rev = applied.get("commit") or applied.get("spec_hash")
    rows = [
        ("when", when(last.get("time"))),
        ("trigger", e(last.get("trigger"))),
        ("plan", _summary(plan.get("summary")) + (f" ({e(plan.get('steps'))} steps)" if plan else "")),
        ("result", result + (f" {e(last.get('error'))}" if last.get("error") else "")),
        ("duration", f"{e(last.get('duration_s'))} s"),
        (
            "applied",
            f"{'commit' if applied.get('commit') else 'spec hash'} {e(rev)} at {when(applied.get('time'))}"
            if rev
            else "nothing applied yet",
        ),
        ("next run", when(w.get("next_run"))),
    ]
    if w.get("dry_run"):
        rows.append(("mode", "dry run: nothing is applied"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    errors = "".join(f"<li>{e(x)}</li>" for x in w.get("spec_errors") or [])
    if w.get("fetch_error"):
        errors += f"<li>git: {e(w['fetch_error'])}</li>"
    errs = f'<h3>Spec errors</h3><ul class="bad" id="spec-errors">{errors}</ul>' if errors else ""
    text = plan.get("text")
    plan_text = f"<details><summary>plan</summary><pre>{e(text)}</pre></details>" if text else ""
    return (
        f'<section id="reconcile"><h2>Last reconcile</h2>{spec_line}'
        f'<table class="kv">{body}</table>{errs}{plan_text}</section>'
    )


def _summary(summary: object) -> str:
    """A plan's counts as `1 to add, 0 to change, 2 to destroy`."""
    if isinstance(summary, Mapping):
        return e(", ".join(f"{summary.get(k, 0)} to {k}" for k in ("add", "change", "destroy")))
    return e(summary)


def events_section(events: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for ev in list(events)[-EVENTS_SHOWN:][::-1]:
        detail = " ".join(
            f"{k}={ev[k]}" for k in ("node", "step", "name", "error", "message") if ev.get(k) not in (None, "")
        )
        rows.append(f"<tr><td>{when(ev.get('time'))}</td><td>{e(ev.get('event'))}</td><td>{e(detail)}</td></tr>")
    body = "".join(rows) or '<tr><td colspan="3" class="muted">no events</td></tr>'
    return f'<section id="events"><h2>Last events</h2><table class="events"><tbody>{body}</tbody></table></section>'


def routing_section(routes: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for r in routes:
        chain = []
        for link in r.get("chain") or []:
            models = " ".join(
                f'<span class="rm {e(m.get("state"))}" title="{e(m.get("why"))}">{e(m.get("model"))}</span>'
                for m in link.get("models") or []
            )
            chain.append(f'<span class="cat">{e(link.get("category"))}:</span> {models}')
        answer = r.get("answer")
        now = (
            f'<span class="rm up">{e(answer.get("model"))}</span> on {e(answer.get("node"))}'
            + (" (fallback)" if answer.get("fallback_used") else "")
            if isinstance(answer, Mapping)
            else '<span class="badge bad">none</span>'
        )
        rows.append(
            f'<tr data-category="{e(r.get("category"))}"><th>{e(r.get("category"))}</th>'
            f'<td>{" → ".join(chain)}</td><td>{now}</td><td class="muted">{e(r.get("reason"))}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="4" class="muted">no routing</td></tr>'
    return (
        '<section id="routing"><h2>Routing</h2><table class="routing"><thead><tr><th>category</th>'
        "<th>preferred → fallbacks</th><th>answers now</th><th>why</th></tr></thead>"
        f"<tbody>{body}</tbody></table></section>"
    )


def placement_notes(status: Mapping[str, Any]) -> str:
    p = status.get("placement") or {}
    items = [
        f"<li>not placed: {e(u.get('model'))}#{e(u.get('replica'))}: {e(u.get('reason'))}</li>"
        for u in p.get("unplaced") or []
    ]
    items += [f"<li>{e(n)}</li>" for n in p.get("notes") or []]
    items += [f'<li class="warn">{e(w)}</li>' for w in status.get("warnings") or []]
    return f'<ul id="notes">{"".join(items)}</ul>' if items else ""


# --------------------------------------------------------------------------- the page


def render_main(status: Mapping[str, Any]) -> str:
    """Everything below the title: what the JavaScript swaps in on a refresh."""
    nodes: Mapping[str, Mapping[str, Any]] = status.get("nodes") or {}
    cards = "".join(node_card(name, n) for name, n in nodes.items())
    verdict = (status.get("health") or {}).get("verdict")
    return (
        f'<p class="muted">cluster {badge(verdict)} · generated {when(status.get("generated"))} · placement'
        f" {e((status.get('placement') or {}).get('status'))}</p>"
        f"{tiers_section(status)}{placement_notes(status)}"
        f'<section id="nodes"><h2>Nodes</h2>{cards}</section>'
        f"{routing_section(status.get('routing') or [])}{reconcile_section(status)}"
        f"{events_section(status.get('events') or [])}"
    )


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:18px;margin:0}#stamp{color:#aab}
main{padding:8px 20px 40px}h2{font-size:16px;margin:18px 0 6px}h3{font-size:14px;margin:4px 0}
.badge{display:inline-block;padding:0 6px;border-radius:3px;font-size:12px;font-weight:600;color:#fff;background:#889}
.ok{color:#2e7d32}.bad{color:#c62828}.warn{color:#a06000}.muted{color:#667}
.idle{color:#1565c0}.badge.idle{background:#1565c0;color:#fff}.badge.muted{background:#889;color:#fff}
.badge.ok{background:#2e7d32;color:#fff}.badge.warn{background:#d08700;color:#fff}.badge.bad{background:#c62828;color:#fff}
.tiers{display:flex;gap:10px;flex-wrap:wrap}
.tier,.node{background:#fff;border:1px solid #dde;border-radius:6px;padding:8px 12px}
.tier{min-width:180px}.node{margin:8px 0}.reasons{margin:4px 0;padding-left:18px;color:#a33}
.reasons.asleep{color:#667;list-style:circle}
.gpu{margin:6px 0}.gpuhead{font-size:12px;color:#334}
.bar{display:flex;height:22px;border:1px solid #99a;border-radius:3px;overflow:hidden;background:#fff}
.bar.actual{height:8px;margin-top:2px;border-color:#ccd}
.seg{height:100%;overflow:hidden;white-space:nowrap;color:#fff;font-size:11px;line-height:22px;
box-sizing:border-box;border-right:1px solid #fff}
.seglabel{padding:0 3px}.seg.reserve{background:repeating-linear-gradient(45deg,#778,#778 4px,#99a 4px,#99a 8px)}
.seg.foreign{background:#445}.seg.free{background:#eef;color:#889}.seg.over{outline:2px solid #c62828}
.legend{list-style:none;margin:2px 0;padding:0;font-size:12px;display:flex;flex-wrap:wrap;gap:2px 14px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.model-name,.pool-name{font-weight:600}.cpu{margin:4px 0;padding-left:18px;font-size:12px}
.members{list-style:none;margin:0 0 0 14px;padding:0}.members li{margin:1px 0}.power{margin:2px 0;font-size:12px}
.seg.pool{background-image:repeating-linear-gradient(135deg,transparent,transparent 6px,#fff3 6px,#fff3 12px)}
table{border-collapse:collapse;font-size:12px;background:#fff}
td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eef}
.rm{padding:0 4px;border-radius:3px;background:#eee}.rm.up{background:#c8e6c9}.rm.down{background:#ffcdd2}
.rm.not-placed{background:#eee;color:#889;text-decoration:line-through}.cat{color:#667}
pre{background:#fff;border:1px solid #dde;padding:6px;font-size:12px;overflow:auto}
"""

SCRIPT = """
(function(){
  var every = %d * 1000, stamp = document.getElementById('stamp');
  function tick(){
    fetch('api/status?view=html', {cache: 'no-store'}).then(function(r){
      if (!r.ok) throw new Error('HTTP ' + r.status);
      return r.json();
    }).then(function(d){
      document.getElementById('main').innerHTML = d.html;
      document.body.setAttribute('data-refreshed', String(d.generated));
      stamp.textContent = 'refreshed ' + new Date().toLocaleTimeString();
    }).catch(function(err){
      stamp.textContent = 'refresh failed (' + err.message + '): showing the last render';
    }).then(function(){ setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
"""


def render_page(status: Mapping[str, Any], refresh_s: int = REFRESH_S) -> str:
    """The whole page, complete without JavaScript."""
    name = e(status.get("cluster"))
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>homelab {name}</title><style>{CSS}</style></head>"
        f'<body data-refreshed="{e(status.get("generated"))}"><header><h1>homelab · {name}</h1>'
        f'<span id="stamp">rendered {when(status.get("generated"))}</span></header>'
        f'<main id="main">{render_main(status)}</main>'
        f"<script>{SCRIPT % int(refresh_s)}</script></body></html>\n"
    )


def api_json(status: Mapping[str, Any], with_html: bool = False) -> str:
    """`/api/status`: the dict; with `with_html`, plus `html` (the page's main part) for the refresh."""
    data = dict(status)
    if with_html:
        data["html"] = render_main(status)
    return json.dumps(data, default=str)
