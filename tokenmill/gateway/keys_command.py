"""`tokenmill keys create|list|revoke|usage`: manage the gateway's API keys from the shell.

The database is `--db URL`, else the `database_url` of `--config gateway.yaml`,
else the gateway's default SQLite file in the per-user data folder. `--json`
prints machine-readable output; otherwise a table. Every failure is one line on
stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

EXIT_ERROR = 2


class KeysCommandError(Exception):
    """A failure to report as one line."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _usd(text: str) -> float:
    try:
        value = float(text.lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount of USD: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative amount of USD, got {text!r}")
    return value


def _since(text: str) -> datetime:
    """'2026-05-01', an ISO time, or a duration back from now: '24h', '7d', '30m'."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.now(timezone.utc) - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use e.g. 2026-05-01, 2026-05-01T12:00, "
                                         "24h or 7d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _add_database_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--db", metavar="URL", default=None,
                       help="database URL: sqlite:///PATH.db or postgresql://USER@HOST/DB (default: the gateway's "
                            "SQLite file in the per-user data folder)")
    where.add_argument("--config", metavar="FILE", default=None,
                       help="gateway.yaml whose database_url to use")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tokenmill keys` subcommands, on the parser of the `keys` command."""
    actions = parser.add_subparsers(dest="keys_action", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create a key and print its secret (shown once)",
                                description="Create an API key. Its secret is printed once: store it, it cannot "
                                            "be recovered (only a salted hash is kept).")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--model", dest="models", action="append", default=[], metavar="MODEL",
                        help="a model or alias the key may use (repeat; * and ? wildcards; default: every model)")
    create.add_argument("--rpm", type=_positive_int, default=None, metavar="N", help="requests per minute")
    create.add_argument("--tpm", type=_positive_int, default=None, metavar="N",
                        help="tokens per minute (prompt + max_tokens reserved at admission, settled to actual use)")
    create.add_argument("--max-concurrent", type=_positive_int, default=None, metavar="N",
                        help="requests in flight at once")
    create.add_argument("--budget", type=_usd, default=None, metavar="USD", help="monthly budget in USD (UTC months)")
    create.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                        help="cap on each request's max_tokens")
    create.add_argument("--no-overflow", action="store_true",
                        help="never send this key's requests to the external (overflow) tier")
    _add_database_arguments(create)
    create.set_defaults(keys_handler=_create)

    listing = actions.add_parser("list", help="list keys (active ones unless --all)",
                                 description="List API keys: id, name, shown prefix, models, limits.")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    _add_database_arguments(listing)
    listing.set_defaults(keys_handler=_list)

    revoke = actions.add_parser("revoke", help="revoke a key", description="Revoke an API key by its id. Gateways "
                                "sharing the database stop accepting it within seconds (their key cache's TTL).")
    revoke.add_argument("key_id", help="the key's id (from `tokenmill keys list`)")
    _add_database_arguments(revoke)
    revoke.set_defaults(keys_handler=_revoke)

    usage = actions.add_parser("usage", help="requests, tokens, cost and errors, per key, model and route",
                               description="Usage from the gateway's ledger: totals and per-model and per-route "
                                           "breakdowns, for one key or all.")
    usage.add_argument("key_id", nargs="?", default=None, help="a key's id (default: every key)")
    usage.add_argument("--since", type=_since, default=None, metavar="TIME",
                       help="only requests since TIME: 2026-05-01, an ISO time, or 24h / 7d back from now")
    _add_database_arguments(usage)
    usage.set_defaults(keys_handler=_usage)


def database_url_from(args: argparse.Namespace) -> str:
    if args.db:
        return args.db
    if args.config:
        import yaml

        path = Path(args.config)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeysCommandError(f"config file not found: {path}") from None
        except OSError as error:
            raise KeysCommandError(f"cannot read {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise KeysCommandError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise KeysCommandError(f"{path}: the config must be a mapping of settings")
        url = document.get("database_url")
        if url is None:
            from tokenmill.gateway.config import default_database_url
            return default_database_url()
        if not isinstance(url, str) or not url.strip():
            raise KeysCommandError(f"{path}: database_url must be a database URL string")
        return url
    from tokenmill.gateway.config import default_database_url
    return default_database_url()


def run_keys(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from tokenmill.gateway.store import DatabaseError, one_line, open_database, redact

    try:
        url = database_url_from(args)
        database = open_database(url)
        try:
            return args.keys_handler(args, database)
        except SQLAlchemyError as error:
            reason = getattr(error, "orig", None) or error
            raise KeysCommandError(f"database {redact(database.url)}: {one_line(reason)}") from None
        finally:
            database.close()
    except (KeysCommandError, DatabaseError, ValueError) as error:
        print(f"tokenmill keys {args.keys_action}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


def _limits_text(limits) -> str:
    parts = []
    if limits.requests_per_minute is not None:
        parts.append(f"{limits.requests_per_minute} rpm")
    if limits.tokens_per_minute is not None:
        parts.append(f"{limits.tokens_per_minute} tpm")
    if limits.max_concurrent is not None:
        parts.append(f"{limits.max_concurrent} concurrent")
    if limits.monthly_budget_usd is not None:
        parts.append(f"${limits.monthly_budget_usd:g}/month")
    if limits.max_tokens is not None:
        parts.append(f"max_tokens {limits.max_tokens}")
    return ", ".join(parts) or "unlimited"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [headers, *rows]]
    return "\n".join(lines)


def _key_rows(keys) -> list[list[str]]:
    return [[key.key_id, key.name, key.prefix + "...", ", ".join(key.allowed_models) or "*",
             _limits_text(key.limits), "yes" if key.allow_overflow else "no",
             key.created_at.strftime("%Y-%m-%d %H:%M"),
             key.revoked_at.strftime("%Y-%m-%d %H:%M") if key.revoked_at else "-"] for key in keys]


_KEY_HEADERS = ["ID", "NAME", "PREFIX", "MODELS", "LIMITS", "OVERFLOW", "CREATED (UTC)", "REVOKED"]


def _create(args: argparse.Namespace, database) -> int:
    from tokenmill.gateway.keys import KeyLimits, KeyStore

    limits = KeyLimits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm, max_concurrent=args.max_concurrent,
                       monthly_budget_usd=args.budget, max_tokens=args.max_tokens)
    record, secret = KeyStore(database).create(args.name, allowed_models=args.models, limits=limits,
                                               allow_overflow=not args.no_overflow)
    warning = "Store this secret now: it is shown only once and cannot be recovered."
    if args.json:
        print(json.dumps({**record.to_dict(), "secret": secret, "warning": warning}, indent=2))
    else:
        print(_table(_KEY_HEADERS, _key_rows([record])))
        print(f"\nsecret: {secret}\n\n{warning}")
    return 0


def _list(args: argparse.Namespace, database) -> int:
    from tokenmill.gateway.keys import KeyStore

    keys = KeyStore(database).list(include_revoked=args.all)
    if args.json:
        print(json.dumps([key.to_dict() for key in keys], indent=2))
    elif not keys:
        print("no keys" + ("" if args.all else " (revoked ones are shown with --all)"))
    else:
        print(_table(_KEY_HEADERS, _key_rows(keys)))
    return 0


def _revoke(args: argparse.Namespace, database) -> int:
    from tokenmill.gateway.keys import KeyStore

    store = KeyStore(database)
    record = store.get(args.key_id)
    if record is None:
        raise KeysCommandError(f"no API key with id {args.key_id!r} (see `tokenmill keys list --all`)")
    revoked_now = store.revoke(args.key_id)
    record = store.get(args.key_id)
    if args.json:
        print(json.dumps({**record.to_dict(), "revoked_now": revoked_now}, indent=2))
    elif revoked_now:
        print(f"revoked {record.key_id} ({record.name})")
    else:
        print(f"{record.key_id} ({record.name}) was already revoked at {record.revoked_at:%Y-%m-%d %H:%M} UTC")
    return 0


def _usage(args: argparse.Namespace, database) -> int:
    from tokenmill.gateway.keys import KeyStore
    from tokenmill.gateway.ledger import Ledger

    if args.key_id is not None and KeyStore(database).get(args.key_id) is None:
        raise KeysCommandError(f"no API key with id {args.key_id!r} (see `tokenmill keys list --all`)")
    report = Ledger(database).usage(key_id=args.key_id, since=args.since)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    scope = f"key {args.key_id}" if args.key_id else "all keys"
    since = f" since {args.since:%Y-%m-%d %H:%M} UTC" if args.since else ""
    print(f"usage of {scope}{since}")
    headers = ["", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "COST (USD)", "ERRORS", "FORMAT OK"]

    def row(label: str, measures: dict) -> list[str]:
        compliance = measures["format_compliance"]
        return [label, str(measures["requests"]), str(measures["prompt_tokens"]),
                str(measures["completion_tokens"]), f"{measures['cost_usd']:.6f}", str(measures["errors"]),
                f"{compliance:.1%}" if compliance is not None else "-"]

    print(_table(headers, [row("total", report["totals"])]))
    for title, breakdown in (("model", report["by_model"]), ("route", report["by_route"])):
        if breakdown:
            print()
            print(_table([title.upper(), *headers[1:]], [row(name, measures) for name, measures in breakdown.items()]))
    feedback = report["feedback"]
    if feedback["up"] or feedback["down"]:
        print(f"\nfeedback: {feedback['up']} up, {feedback['down']} down")
    return 0
