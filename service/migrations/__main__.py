"""`python -m service.migrations`: the job store's schema by hand. `leoclr serve` upgrades it on
start; this is for a database the service's account may not alter (an administrator upgrades it
first), and for a developer adding a revision."""

from __future__ import annotations

import argparse
import sys

from service import migrations
from service.store import shown, store_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.migrations", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="the job store (default: LEOCLR_DATABASE_URL, or the SQLite file under "
                                      "LEOCLR_DATA_DIR, as `leoclr serve` reads them)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("current", help="print the revision the database is at, and the newest")
    up = sub.add_parser("upgrade", help="upgrade the database to the newest revision (the default command)")
    up.add_argument("revision", nargs="?", default="head")
    rev = sub.add_parser("revision", help="write a new revision file (a developer's command)")
    rev.add_argument("-m", "--message", required=True)
    rev.add_argument("--autogenerate", action="store_true", help="from the difference between the models "
                                                                  "(service/store.py) and the database at --url")
    args = parser.parse_args(argv)
    if args.url is None:
        from service.settings import ServiceSettings

        args.url = ServiceSettings().job_database_url
    url = store_url(args.url)
    if args.command == "current":
        print(f"{shown(url)}: at {migrations.current(url) or 'no revision'}; newest {migrations.HEAD}")
    elif args.command == "revision":
        from alembic import command

        # numbered after the newest (0003_...py), as the ones before; then set migrations.HEAD to it
        command.revision(migrations.config(url=url.render_as_string(hide_password=False)), args.message,
                         autogenerate=args.autogenerate, rev_id=f"{int(migrations.HEAD) + 1:04d}")
    else:
        try:
            before, after = migrations.upgrade(url, getattr(args, "revision", "head"))
        except migrations.SchemaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{shown(url)}: {before or 'no revision'} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
