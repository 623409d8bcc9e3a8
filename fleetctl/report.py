"""How results look to a person: rich tables, progress bars and error lines.
Only this module and the CLI import rich; everything else hands them values.

Every text that comes from a host, an inventory or the user (host names, errors, a command's
output, reasons, paths) goes through ``lit`` before rich sees it: rich reads ``[word]`` as markup,
so a stderr line holding ``[/x]`` would otherwise end the recap in a traceback, and ``[a:b]`` in
an error message would vanish."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fleetctl.status import Status

if TYPE_CHECKING:  # only named in annotations: `fleetctl facts` does not load the planner
    from fleetctl.decide.plan import HostPlan
    from fleetctl.decide.transfer import TransferPlan
    from fleetctl.facts.probe import Facts
    from fleetctl.reach.fanout import Outcome

STATUS_STYLE = {Status.OK: "green", Status.CHANGED: "yellow", Status.FAILED: "red", Status.UNREACHABLE: "magenta",
                Status.TIMEOUT: "red", Status.REFUSED: "red", Status.SKIPPED: "cyan", Status.CLEAN: "green",
                Status.DRIFT: "yellow"}


@contextlib.contextmanager
def progress(console: Console, total: int, what: str) -> Iterator[Callable[[Outcome], None]]:
    """A bar that advances as hosts answer; a no-op where stdout is not a terminal."""
    if not console.is_terminal or total == 0:
        yield lambda outcome: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(lit(what)), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=console, transient=True)
    with bar:
        task = bar.add_task("", total=total)
        yield lambda outcome: bar.update(task, advance=1, description=lit(outcome.host.name))


def lit(text) -> str:
    """*text* as rich prints it literally (None as '-')."""
    return "-" if text is None else escape(str(text))


def status(text: str) -> str:
    return f"[{STATUS_STYLE.get(text, 'white')}]{lit(text)}[/]"


def gpu_summary(facts: Facts) -> str:
    if not facts.gpus:
        return lit(facts.gpu_error or "none")
    counts = Counter((g.name, g.compute_capability or "?") for g in facts.gpus)
    return lit("\n".join(f"{n}× {name} (sm {cc})" for (name, cc), n in counts.items()))


def installed_summary(facts: Facts) -> str:
    inst = facts.installed
    if not inst:
        return "-"
    parts = [f"torch {inst.torch}" if inst.torch else None, f"vllm {inst.vllm}" if inst.vllm else None,
             f"flashinfer {inst.flashinfer}" if inst.flashinfer else None]
    return lit("\n".join(p for p in parts if p) or "empty env")


def facts_table(outcomes: Iterable[Outcome]) -> Table:
    table = Table(title="fleet facts", show_lines=True)
    for column in ("host", "status", "GPUs", "driver / CUDA", "OS", "arch / glibc", "Python", "nvcc", "installed",
                   "reached as"):
        table.add_column(column)
    for o in outcomes:
        if not o.ok:
            table.add_row(lit(o.host.name), status(o.status), f"[red]{lit(o.error)}[/]", "", "", "", "", "", "", "")
            continue
        f: Facts = o.value
        table.add_row(
            lit(o.host.name), status(o.status), gpu_summary(f),
            lit(f"{f.driver_version} / {f.cuda_driver_version}" if f.driver_version else "-"),
            lit(f.os.pretty_name or "-"),
            lit(f"{f.arch} / {f.glibc}"),
            lit(f.python.version) if f.python else "[red]none[/]",
            lit(f.nvcc or "-"),
            installed_summary(f),
            lit(reached_as(f)),
        )
    return table


def reached_as(f: Facts) -> str:
    """``admin, sudo as root (password)``: the login user, its become and its sudo mode."""
    how = f"{f.become} ({f.sudo})" if f.become else f"sudo: {f.sudo}" if f.sudo and f.sudo != "root" else ""
    return ", ".join(part for part in (f.user or "?", how) if part)


def print_errors(console: Console, outcomes: Iterable[Outcome]) -> None:
    for o in outcomes:
        if not o.ok:
            fix = f" ({o.fix})" if o.fix else ""
            console.print(f"{status(o.status)} {lit(o.host.name)}: {lit(o.error)}{lit(fix)}", highlight=False)


def print_summary(console: Console, outcomes: list[Outcome]) -> None:
    counts = Counter(o.status for o in outcomes)
    line = ", ".join(f"{status(s)}={n}" for s, n in sorted(counts.items()))
    console.print(f"{len(outcomes)} hosts: {line}", highlight=False)


def plan_table(plans: Iterable[HostPlan], what_if_cuda: str | None = None) -> Table:
    title = f"plan: what if the fleet moved to CUDA {lit(what_if_cuda)}" if what_if_cuda else "plan"
    table = Table(title=title, show_lines=True)
    plans = list(plans)
    drivers = any(p.driver for p in plans)  # plan --driver: two more columns
    for column in ("host", "status", "stack", "runtime", "why", "changes") + (("driver", "driver commands")
                                                                            if drivers else ()):
        table.add_column(column)
    for p in plans:
        r = p.resolution
        extra = driver_cells(p.driver) if drivers else []
        if not r.ok:
            table.add_row(lit(p.host.name), status(p.status), f"[red]{lit(r.fix)}[/]", "", lit("\n".join(r.reasons)), "",
                          *extra)
            continue
        s = r.stack
        stack = "\n".join(x for x in (
            f"Python {s.python}",
            f"torch {s.torch}" + (f" CUDA {s.cuda}" if s.cuda else ""),
            f"{s.vllm_package} {s.vllm}",
            f"flashinfer {s.flashinfer}" if s.flashinfer else None,
            s.container_image) if x)
        runtime = "\n".join(x for x in (s.attention_backend, s.cudagraph_mode,
                                         f"arch {s.torch_cuda_arch_list}" if s.torch_cuda_arch_list else None) if x)
        why = [*r.reasons, *([p.proof.text()] if p.proof else [])]
        table.add_row(lit(p.host.name), status(p.status), lit(stack), lit(runtime or "-"), lit("\n".join(why)),
                      lit("\n".join(p.changes) or "none"), *extra)
    return table


def driver_cells(move) -> list[str]:
    """The plan table's driver columns: the move with its reasons, and its install and rollback commands."""
    if move is None:
        return ["none: the driver runs this CUDA", "-"]
    if not move.ok:
        return [f"[red]{lit(move.summary)}[/]\n{lit(move.fix)}", "-"]
    return [lit("\n".join((move.summary, *move.reasons))),
            lit("\n".join((*move.install, "rollback:", *(move.rollback or ("(none)",)))))]


def print_refusals(console: Console, plans: Iterable[HostPlan]) -> None:
    for p in plans:
        if not p.resolution.ok:
            console.print(f"{status(p.status)} {lit(p.host.name)}: {lit(p.resolution.reasons[-1])} "
                          f"({lit(p.resolution.fix)})",
                          highlight=False, soft_wrap=True)


def recap_table(outcomes: Iterable[Outcome], diff: bool = False) -> Table:
    """Ansible's PLAY RECAP, with the stack, the kernel verdict and time to first token."""
    table = Table(title="recap", show_lines=diff)
    for column in ("host", "status", "ok", "changed", "failed", "skipped", "stack", "kernel", "TTFT"):
        table.add_column(column)
    if diff:
        table.add_column("changes")
    for o in outcomes:
        if not o.ok:
            table.add_row(lit(o.host.name), status(o.status), "", "", "", "", f"[red]{lit(o.error)}[/]", "", "",
                          *([""] if diff else []))
            continue
        run = o.value
        counts = run.counts()
        kernel = next((s.status for s in run.steps if s.name == "validate"), "-")
        ttft = run.figure("smoke", "ttft_s")
        row = [lit(o.host.name), status(o.status),
               *(str(counts[s]) for s in (Status.OK, Status.CHANGED, Status.FAILED, Status.SKIPPED)),
               lit((run.stack or {}).get("id", "-")),
               {Status.OK: "pass", Status.FAILED: "[red]fail[/]"}.get(kernel, lit(kernel)),
               f"{ttft:.2f} s" if ttft else "-"]
        table.add_row(*row, *([lit("\n".join(run.changes) or "none")] if diff else []))
    return table


def print_failed_steps(console: Console, outcomes: Iterable[Outcome]) -> None:
    for o in outcomes:
        if o.ok:
            for step in o.value.steps:
                if step.status == Status.FAILED:
                    console.print(f"{status(step.status)} {lit(o.host.name)} {lit(step.name)}: {lit(step.detail)}",
                                  highlight=False, soft_wrap=True)
                    if step.tail:  # a command's own output: printed as it came, never read as markup
                        console.print(step.tail, highlight=False, style="dim", soft_wrap=True, markup=False)


def audit_table(audit_report: dict) -> Table:
    table = Table(title=f"drift against fleet.lock ({lit(audit_report['time'])})", show_lines=True)
    for column in ("host", "status", "drift"):
        table.add_column(column)
    since = (audit_report.get("since") or {}).get("changes", {})
    if "since" in audit_report:
        table.add_column(f"since {lit(audit_report['since']['run_id'])}")
    for name, h in audit_report["hosts"].items():
        details = "\n".join(f"{d['kind']}: {d['detail']}" for d in h.get("drift", [])) or h.get("error") or "-"
        # a host the audit could not read is red, however it failed
        row = [lit(name), status(h["status"]) if h["status"] in (Status.CLEAN, Status.DRIFT)
               else f"[red]{lit(h['status'])}[/]", lit(details)]
        if "since" in audit_report:
            row.append(lit("\n".join(since.get(name, [])) or "-"))
        table.add_row(*row)
    return table


def rollout_plan(journal) -> str:
    """The rollout's waves as lines of rich markup (every name and reason escaped)."""
    d = journal.data
    lines = [f"rollout {lit(d['run_id'])}: {sum(len(w) for w in d['waves'])} host(s) move in {len(d['waves'])} "
             f"wave(s) (failure budget {d['budget']})"]
    lines += [f"  wave {i}: {lit(', '.join(w))}" for i, w in enumerate(d["waves"], 1)]
    for name, h in d["hosts"].items():  # where its proofs run; what a driver move will run there, command for command
        if proof := h.get("proof"):
            lines.append(f"  {lit(name)}: proofs {lit(proof['mode'])}: {lit(proof['refusal'] or proof['reason'])}")
        if move := h.get("driver"):
            lines.append(f"  {lit(name)}: driver {lit(move['from'] or 'none')} → R{lit(move['branch'])} "
                         f"({lit(move['flavor'] or '')} modules, {lit(move['distro'] or '')}): drain, then")
            lines += [f"      {lit(command)}" for command in move["install"]]
            lines.append("      reboot; verify the driver and every GPU; provision and gate; undrain")
    lines += [f"  left alone: {lit(n)} ({lit(a['reason'])}{': ' + lit(a['why']) if a.get('why') else ''})"
              for n, a in d["left_alone"].items()]
    return "\n".join(lines)


def print_planned_actions(console: Console, journal) -> None:
    """rollout --check and --rollback --check: each host's planned actions, as provision --check --json
    records them (the step, what it changes, the command or the file copied)."""
    for name, h in journal.data["hosts"].items():
        steps = (h.get("planned") or {}).get("steps") or (h.get("rollback_plan") or {}).get("steps") or []
        plan = h.get("rollback_plan") or {}
        if not steps and not plan and not (h.get("planned") or {}).get("error"):
            continue
        console.print(f"{lit(name)}:", highlight=False)
        if error := (h.get("planned") or {}).get("error") or plan.get("error"):
            console.print(f"  [red]{lit(error)}[/]", highlight=False)
        for command in plan.get("driver") or []:
            console.print(f"  driver back: {lit(command)}", highlight=False)
        if plan.get("reboot"):
            console.print("  reboot, then verify the previous driver branch", highlight=False)
        for step in steps:
            for action in step.get("actions") or ():
                what = action.get("command") or f"copy {action.get('put')} → {action.get('to')}"
                console.print(f"  {lit(step['name'])}: {lit(action.get('change') or action['why'])}: "
                              f"{lit(what.splitlines()[0] if what else '')}", highlight=False, soft_wrap=True)


def rollout_table(journal) -> Table:
    d = journal.data
    table = Table(title=f"rollout {lit(d['run_id'])}: {lit(d['status'])}")
    for column in ("host", "wave", "state", "from", "to", "detail"):
        table.add_column(column)
    for name, h in d["hosts"].items():
        style = {"done": "green", "reverted": "cyan", "rolled_back": "yellow"}.get(h["state"], "red")
        detail = h.get("rollback") or h.get("error") or ""
        if h.get("downtime_s") is not None:  # exclusive proofs: the service was stopped for them
            detail = f"proofs exclusive, {h['downtime_s']:.0f} s without service" + (f"; {detail}" if detail else "")
        if h.get("driver"):
            detail = (f"driver → R{h['driver']['branch']}" + (f", stopped at {h['stopped_at']}" if h.get("stopped_at")
                                                              else "") + (" (drained)" if h.get("drained") else "")
                      + (f": {detail}" if detail else ""))
        table.add_row(lit(name), str(h.get("wave", "-")), f"[{style}]{lit(h['state'])}[/]", lit(h.get("from") or "-"),
                      lit(h["to"]), lit(detail))
    for name, a in d["left_alone"].items():
        table.add_row(lit(name), "-", "left alone", "-", "-",
                      lit(f"{a['reason']}{': ' + a['why'] if a.get('why') else ''}"))
    return table


HEALTH_STYLE = {"healthy": "green", "degraded": "yellow", "unhealthy": "red", "unknown": "white"}


def health_table(result: dict) -> Table:
    """`fleetctl health`: a row per host, its GPUs' verdicts, what was found with NVIDIA's action, and what was not read."""
    table = Table(title="GPU health", show_lines=True)
    for column in ("host", "health", "GPUs", "findings and actions", "not read"):
        table.add_column(column)
    for name, h in result["hosts"].items():
        if "verdict" not in h:
            table.add_row(lit(name), status(h["status"]), "", f"[red]{lit(h.get('error'))}[/]", "")
            continue
        v = h["verdict"]
        gpus = " ".join(f"[{HEALTH_STYLE[s]}]#{i}[/]" for i, s in v["gpus"].items()) or "none"  # not a count
        table.add_row(lit(name), f"[{HEALTH_STYLE[h['status']]}]{h['status']}[/]", gpus,
                      lit("\n".join(f["reason"] for f in v["findings"]) or "-"), lit("\n".join(v["notes"]) or "-"))
    return table


def print_transfer(console: Console, model: str, plan: TransferPlan) -> None:
    """A model's transfer plan: each round's copies, and the bytes over the controller's link against a push
    of one copy per host."""
    gib = 2 ** 30
    for number, copies in enumerate(plan.rounds, 1):
        console.print(f"round {number}: " + ", ".join(f"{lit(c.source)} → {lit(c.dest)}" for c in copies),
                      highlight=False)
    console.print(f"{lit(model)}: {plan.hosts} host(s), {plan.controller_copies} cop(ies) over this machine's link: "
                  f"{plan.controller_bytes / gib:.2f} GiB (a copy per host: {plan.naive_bytes / gib:.2f} GiB)",
                  highlight=False)
