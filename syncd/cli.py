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

    def journal(self):
        from syncd.journal import open_journal
        from syncd.masking import register_secrets

        cfg = self.config()
        register_secrets(cfg.secrets())
        try:
            return open_journal(cfg.journal.url, base_dir=str(cfg.base_dir))
        except Exception as exc:
            from syncd.masking import mask_text

            click.echo(f"syncd: cannot open journal: {mask_text(str(exc))}", err=True)
            sys.exit(2)


pass_ctx = click.make_pass_decorator(Ctx)


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
@pass_ctx
def check(c: Ctx) -> None:
    """Validate config and mappings against each enabled CRM's own field metadata."""
    from syncd.check import hubspot_email_mode, run_check

    try:
        cfg = c.config()
        problems = run_check(cfg)
        for line in hubspot_email_mode(cfg):
            click.echo(line, err=True)  # information: stdout stays one line per problem
    except ConfigError as exc:
        problems = str(exc).splitlines()
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
    counts = c.journal().reports.counts()
    if as_json:
        click.echo(json.dumps(counts, sort_keys=True))
        return
    d, r = counts["deliveries"], counts["reflections"]
    click.echo(f"deliveries   pending {d['pending']} (retrying {d['retrying']})  done {d['done']}  dead {d['dead']}")
    click.echo(f"events       received {counts['events']['received']}  unrouted {counts['events']['unrouted']}"
               f"  quarantined {counts['quarantined']}  ignored {counts.get('ignored', 0)}")
    click.echo(f"reflections  pending {r['pending']}  done {r['done']}  failed {r['failed']}")
    age = counts["oldest_pending_age_seconds"]
    click.echo(f"oldest pending: {'-' if age is None else f'{age:.0f} s'}")
    for crm, info in counts["crms"].items():
        click.echo(f"{crm}: last push {info['last_push_at'] or '-'}  last poll {info['last_poll_at'] or '-'}")


@cli.command("dead-letters")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per dead letter.")
@pass_ctx
def dead_letters(c: Ctx, as_json: bool) -> None:
    """Dead deliveries (d<N>) and quarantined events (q<N>), with the reason."""
    rows = c.journal().reports.dead_letters()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        target = f"{row['crm']}:{row['object']}:{row['record_id']}" if row["crm"] else "(unrouted)"
        click.echo(f"{row['id']:>6}  {row['source']:<6} {row['kind'] or '-':<14} {row['channel'] or '-':<8} "
                   f"{target}  {row['error']}")


@cli.command()
@click.argument("ids", nargs=-1)
@click.option("--all-dead", is_flag=True, help="Re-queue every dead letter.")
@pass_ctx
def replay(c: Ctx, ids: tuple[str, ...], all_dead: bool) -> None:
    """Re-queue dead letters by id (d<N>, q<N>) or all of them."""
    if bool(ids) == all_dead:
        raise click.UsageError("give dead-letter ids or --all-dead (not both)")
    try:
        n = c.journal().replay(None if all_dead else list(ids))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"re-queued {n}")


EXPORT_COLUMNS = ["event_id", "source", "source_event_id", "received_at", "occurred_at", "kind", "channel",
                  "target_crm", "target_object", "target_record", "state", "delivered_at", "attempts",
                  "error", "outcome", "reflection", "reflection_at", "reflection_error", "raw_channel",
                  "unmodelled"]


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
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
    rows = c.journal().reports.export_rows(when)
    out = click.get_text_stream("stdout")
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
        return
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)


@cli.command()
@click.option("--keep", is_flag=True, help="Keep serving after the demo (Ctrl-C to stop).")
def demo(keep: bool) -> None:
    """Run the daemon against built-in sandbox CRMs and show an opt-out land."""
    from syncd.demo import run_demo

    sys.exit(run_demo(keep=keep))


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="syncd")


if __name__ == "__main__":  # pragma: no cover
    main()

