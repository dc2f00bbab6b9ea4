"""The ``syncd`` command line."""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

import click

from syncd.config import Config, ConfigError, load_config
from syncd.logs import setup_logging


def _config_path(value: str | None) -> str:
    return value or os.environ.get("SYNCD_CONFIG") or "config.yaml"


class Ctx:
    def __init__(self, path: str, log_format: str | None, log_level: str | None):
        self.path = path
        self.log_format = log_format
        self.log_level = log_level
        self._cfg: Config | None = None

    def config(self) -> Config:
        if self._cfg is None:
            try:
                self._cfg = load_config(self.path)
            except ConfigError as exc:
                for line in str(exc).splitlines():
                    click.echo(f"syncd: config error: {line}", err=True)
                sys.exit(2)
            setup_logging(self.log_level or self._cfg.logging.level, self.log_format or self._cfg.logging.format)
        return self._cfg

    def journal(self, must_exist: bool = True):
        """The configured journal. Every command but ``serve`` reads an existing one: a
        typo in ``journal.url`` must not create an empty journal and report zeros."""
        from syncd.journal import JournalMissing, open_journal
        from syncd.masking import register_secrets

        cfg = self.config()
        register_secrets(cfg.secrets())
        try:
            return open_journal(cfg.journal.url, base_dir=str(cfg.base_dir), must_exist=must_exist)
        except JournalMissing as exc:
            click.echo(f"syncd: {exc}", err=True)
            sys.exit(2)
        except Exception as exc:
            from syncd.masking import mask_text

            click.echo(f"syncd: cannot open journal: {mask_text(str(exc))}", err=True)
            sys.exit(2)


pass_ctx = click.make_pass_decorator(Ctx)


def _set_config_path(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Ctx).path = value


# ``-c PATH`` is also accepted after the subcommand (``syncd status -c prod.yaml``).
config_option = click.option("-c", "--config", "config_path", metavar="PATH", expose_value=False,
                             callback=_set_config_path, help="Config file (same as before the command).")


def _echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, sort_keys=True, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", metavar="PATH",
              help="Config file (default: $SYNCD_CONFIG, then ./config.yaml).")
@click.option("--log-format", type=click.Choice(["json", "text"]), default=None,
              help="Log format (default: logging.format from config, json).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default=None)
@click.version_option(package_name="syncd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_format: str | None, log_level: str | None) -> None:
    """syncd keeps opt-outs in step between messaging platforms and CRMs."""
    ctx.obj = Ctx(_config_path(config_path), log_format, log_level)


@cli.command()
@pass_ctx
def serve(c: Ctx) -> None:
    """Run the webhook receiver and the scheduler (one process)."""
    from syncd.daemon import serve as run

    sys.exit(run(c.config()))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"ok": bool, "problems": [...]}.')
@pass_ctx
def check(c: Ctx, as_json: bool) -> None:
    """Validate config and mappings against each enabled CRM's own field metadata."""
    from syncd.check import email_modes, run_check

    def progress(line: str) -> None:
        click.echo(f"syncd check: {line}", err=True)

    try:
        cfg = c.config()
        problems = run_check(cfg, progress=progress)
        for line in email_modes(cfg):
            click.echo(line, err=True)  # information: stdout stays one line per problem
    except ConfigError as exc:
        problems = str(exc).splitlines()
    if as_json:
        _echo_json({"ok": not problems, "problems": problems})
        sys.exit(1 if problems else 0)
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"{len(problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo("ok: config, mappings and CRM fields agree")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Counts by state, oldest pending age, last push per CRM."""
    journal = c.journal()
    counts = journal.reports.counts()
    counts["compliance"] = _compliance_status(c.config(), journal)
    counts["ledger"] = journal.reports.ledger_counts()
    if as_json:
        _echo_json(counts)
        return
    d, r = counts["deliveries"], counts["reflections"]
    click.echo(f"deliveries   pending {d['pending']} (retrying {d['retrying']})  done {d['done']}  dead {d['dead']}")
    click.echo(f"events       received {counts['events']['received']}  unrouted {counts['events']['unrouted']}"
               f"  quarantined {counts['quarantined']}  ignored {counts.get('ignored', 0)}")
    click.echo(f"reflections  pending {r['pending']}  done {r['done']}  failed {r['failed']}")
    _echo_ledger(counts["ledger"])
    age = counts["oldest_pending_age_seconds"]
    click.echo(f"oldest pending: {'-' if age is None else f'{age:.0f} s'}")
    for crm, info in counts["crms"].items():
        click.echo(f"{crm}: last push {info['last_push_at'] or '-'}  last poll {info['last_poll_at'] or '-'}")
    _print_compliance(counts["compliance"])


def _compliance_status(cfg: Config, journal: Any) -> dict[str, Any]:
    """``status``'s ``compliance`` object: the contract's four keys."""
    from syncd.compliance import ComplianceClock

    summary = ComplianceClock.from_config(cfg).summary(journal.compliance)
    return {key: summary[key] for key in ("open", "at_risk", "breached", "oldest_open_age_seconds")}


def _print_compliance(c: dict[str, Any]) -> None:
    age = c["oldest_open_age_seconds"]
    click.echo(f"compliance   open opt-outs {c['open']}  at risk {c['at_risk']}  breached {c['breached']}"
               f"  oldest open {'-' if age is None else f'{age:.0f} s'}")


def _echo_ledger(ledger: dict[str, int]) -> None:
    """The consent ledger's size by state: identity x channel entries."""
    click.echo(f"ledger       opted_out {ledger['opted_out']}  opted_in {ledger['opted_in']}")


@cli.command("dead-letters")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of dead letters ([] when none).")
@pass_ctx
def dead_letters(c: Ctx, as_json: bool) -> None:
    """Dead deliveries (d<N>) and quarantined events (q<N>), with the reason."""
    rows = c.journal().reports.dead_letters()
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        click.echo(f"{row['id']:>6}  {row['source']:<6} {row['kind'] or '-':<14} {row['channel'] or '-':<8} "
                   f"{_target(row)}  {row['error']}")


def _target(row: dict[str, Any]) -> str:
    return f"{row['crm']}:{row['object']}:{row['record_id']}" if row["crm"] else "(unrouted)"


@cli.command()
@click.argument("ids", nargs=-1)
@click.option("--all-dead", is_flag=True, help="Re-queue every dead letter.")
@click.option("--dry-run", is_flag=True, help="Show what would be re-queued; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array: one object per id.")
@pass_ctx
def replay(c: Ctx, ids: tuple[str, ...], all_dead: bool, dry_run: bool, as_json: bool) -> None:
    """Re-queue dead letters by id (d<N>, q<N>, r<N>) or all of them.

    One line per id; exits 1 if any id is malformed, unknown or not dead."""
    if bool(ids) == all_dead:
        raise click.UsageError("give dead-letter ids or --all-dead (not both)")
    journal = c.journal()
    dead = {row["id"]: row for row in journal.reports.dead_letters()}
    results = _replay_plan(dead, list(dead) if all_dead else list(ids), dry_run)
    due = [r["id"] for r in results if r["result"] == "requeued"]
    if due:
        journal.replay(due)  # a row only changes while it is still dead
    if as_json:
        _echo_json(results)
    else:
        _print_replay(results)
    sys.exit(1 if any(r["result"] in ("invalid", "not-dead") for r in results) else 0)


def _replay_plan(dead: dict[str, dict[str, Any]], ids: list[str], dry_run: bool) -> list[dict[str, Any]]:
    """What happens to each id: requeued / would-requeue, or invalid / not-dead with why."""
    from syncd.journal.base import parse_letter_id

    results: list[dict[str, Any]] = []
    for raw in ids:
        try:
            kind, num = parse_letter_id(raw)
        except ValueError as exc:
            results.append({"id": raw, "result": "invalid", "detail": str(exc)})
            continue
        row = dead.get(f"{kind}{num}")
        if row is None:
            results.append({"id": f"{kind}{num}", "result": "not-dead",
                            "detail": "no dead letter with this id (unknown, or not dead; see syncd dead-letters)"})
            continue
        results.append({"id": row["id"], "result": "would-requeue" if dry_run else "requeued",
                        "target": _target(row), "detail": row["error"]})
    return results


def _print_replay(results: list[dict[str, Any]]) -> None:
    verbs = {"requeued": "re-queued", "would-requeue": "would re-queue", "invalid": "not re-queued",
             "not-dead": "not re-queued"}
    if not results:
        click.echo("no dead letters")
    for r in results:
        where = f"  {r['target']}" if r.get("target") else ""
        detail = f"  ({r['detail']})" if r["detail"] else ""
        click.echo(f"{r['id']}: {verbs[r['result']]}{where}{detail}")


EXPORT_COLUMNS = ["event_id", "source", "source_event_id", "received_at", "occurred_at", "kind", "channel",
                  "target_crm", "target_object", "target_record", "state", "delivered_at", "attempts",
                  "error", "outcome", "reflection", "reflection_at", "reflection_error", "raw_channel",
                  "unmodelled", "deadline", "honoured_at", "within_deadline",
                  "phone", "email"]   # the consent ledger's identities (E.164; lower-cased email)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "json"]), default="csv", show_default=True,
              help="json: one array; jsonl: one object per line.")
@click.option("--since", default=None, metavar="ISO", help="Only events received at or after this time.")
@pass_ctx
def export(c: Ctx, fmt: str, since: str | None) -> None:
    """The audit trail: one row per event x target."""
    when = None
    if since:
        try:
            from syncd.events import parse_iso

            when = parse_iso(since)
        except ValueError:
            raise click.BadParameter(f"not an ISO 8601 date-time: {since!r}", param_hint="--since") from None
    rows = _with_deadlines(c.config(), c.journal().reports.export_rows(when))
    out = sys.stdout
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
        return
    if fmt == "json":  # one document, streamed row by row
        out.write("[")
        for n, row in enumerate(rows):
            out.write(("," if n else "") + "\n" + json.dumps(row, sort_keys=True))
        out.write("\n]\n")
        return
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        if row.get("within_deadline") is not None:
            row["within_deadline"] = "true" if row["within_deadline"] else "false"
        writer.writerow(row)


def _with_deadlines(cfg: Config, rows: Any) -> Any:
    """The compliance clock's columns on each export row: ``deadline``, ``honoured_at``
    and ``within_deadline`` (empty while open and the deadline is ahead)."""
    from syncd.compliance import ComplianceClock

    clock = ComplianceClock.from_config(cfg)
    now = clock.now()
    for row in rows:
        row.update(clock.export_columns(row, now))
        yield row


@cli.command()
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (personal data unmasked).")
@pass_ctx
def trace(c: Ctx, query: str, as_json: bool) -> None:
    """The whole story of a phone, an email, a CRM record id or an event id.

    Exits 1 when the journal knows nothing about QUERY, 2 when QUERY is none of these."""
    from syncd.trace import BadQuery, found_anything, render_text, tracer_for

    cfg = c.config()
    tracer = tracer_for(cfg, reports=None)   # the query is read first: a bad one needs no journal
    try:
        parsed = tracer.parse(query)
    except BadQuery as exc:
        click.echo(f"syncd trace: {exc}", err=True)
        sys.exit(2)
    tracer.reports = c.journal().reports
    doc = tracer.read(parsed)
    if as_json:
        _echo_json(doc)
    elif found_anything(doc):
        click.echo(render_text(doc))
    if not found_anything(doc):
        click.echo(f"syncd trace: nothing found for {parsed.text!r}: no event, consent entry or registration "
                   "in Sinch", err=True)
        sys.exit(1)


@cli.command()
@click.option("--crm", "crm_name", default=None, metavar="NAME", help="Audit one CRM only (default: every enabled one).")
@click.option("--repair", is_flag=True, help="Queue a delivery for each drifted record (the running daemon pushes it).")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object: {"checked": n, "drift": [...], "repaired": n, "missing": [...], "errors": [...]}.')
@pass_ctx
def audit(c: Ctx, crm_name: str | None, repair: bool, as_json: bool) -> None:
    """Compare each written record's consent fields with the ledger (exit 1: drift left)."""
    from syncd.audit import Auditor
    from syncd.runtime import build_connectors, load_mappings

    cfg = c.config()
    enabled = list(cfg.crm.blocks())
    if crm_name is not None and crm_name not in enabled:
        raise click.BadParameter(f"{crm_name!r} is not an enabled CRM (enabled: {', '.join(enabled) or 'none'})",
                                 param_hint="--crm")
    journal = c.journal()
    try:
        mappings = load_mappings(cfg)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            click.echo(f"syncd: config error: {line}", err=True)
        sys.exit(2)
    auditor = Auditor(journal, build_connectors(cfg, mappings), mappings)
    with _audit_progress(show=not as_json and sys.stdout.isatty()) as bar:
        result = auditor.run(crm_name, repair=repair, progress=bar.update, on_total=bar.reset)
    journal.close()
    if as_json:
        _echo_json(result.as_json())
    else:
        _print_audit(result, repair)
    sys.exit(1 if result.drift_left or result.errors else 0)


def _audit_progress(show: bool) -> Any:
    """A progress bar on stderr while records are read; a silent stand-in otherwise."""
    from tqdm import tqdm  # type: ignore[import-untyped]   # tqdm ships no type hints

    return tqdm(total=0, unit="record", desc="audit", file=sys.stderr, disable=not show, leave=False)


def _print_audit(result: Any, repair: bool) -> None:
    for d in result.drift:
        click.echo(f"drift  {d.crm} {d.object} {d.record_id}  {d.field}: expected {d.expected!r}, "
                   f"found {d.actual!r}")
    for ref in result.missing:
        click.echo(f"gone   {ref.crm} {ref.obj} {ref.record_id}: the record is no longer in the CRM "
                   f"(deleted or merged); nothing to compare")
    for line in result.errors:
        click.echo(f"syncd audit: {line}", err=True)
    summary = f"checked {result.checked} record(s): {len(result.drift)} drifted field(s)"
    if repair:
        summary += f", {result.repaired} queued for repair (the running daemon pushes them)"
    elif result.drift:
        summary += "; run with --repair to set them again"
    click.echo(summary)


@cli.command("send-test")
@click.argument("source", type=click.Choice(["apten", "lox24", "sinch"]))
@click.option("--phone", default=None, metavar="E164", help="Put this phone in the example.")
@click.option("--record", default=None, metavar="ID", help="Put this CRM record id in the example (apten).")
@click.option("--url", "base_url", default=None, metavar="URL",
              help="Receiver base URL (default: http://receiver.host:receiver.port).")
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"url", "status", "answer"}.')
@pass_ctx
def send_test(c: Ctx, source: str, phone: str | None, record: str | None, base_url: str | None,
              as_json: bool) -> None:
    """Post SOURCE's documented example, signed with the configured secret, to the running receiver."""
    import requests

    from syncd.check import connection_cause
    from syncd.send_test import receiver_url, send

    cfg = c.config()
    try:
        answer = send(cfg, source, phone, record, base_url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except ConfigError as exc:
        click.echo(f"syncd: config error: {exc}", err=True)
        sys.exit(2)
    except requests.RequestException:
        url = base_url or receiver_url(cfg)
        cause = connection_cause(requests.Session(), url) or "no answer"
        click.echo(f"syncd: cannot reach the receiver at {url}: {cause} (is syncd serve running?)", err=True)
        sys.exit(2)
    try:
        parsed: Any = json.loads(answer.body)
    except ValueError:
        parsed = answer.body
    if as_json:
        _echo_json({"url": answer.url, "status": answer.status, "answer": parsed})
    else:
        click.echo(f"POST {answer.url} -> {answer.status} {answer.body}")
    sys.exit(0 if 200 <= answer.status < 300 else 1)


@cli.command()
@click.option("--keep", is_flag=True, help="Keep serving after the demo (Ctrl-C to stop).")
def demo(keep: bool) -> None:
    """Run the daemon against built-in sandbox CRMs and show an opt-out land."""
    from syncd.demo import run_demo

    sys.exit(run_demo(keep=keep))


for _command in list(cli.commands.values()):
    if _command.name != "demo":
        config_option(_command)


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="syncd")


if __name__ == "__main__":  # pragma: no cover
    main()

