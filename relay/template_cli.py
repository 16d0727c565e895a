"""`relay template create|update|show|list|delete|render`: the API's template operations from the command line,
on the same store (relay/templates.py).

Parts are given as text or read from files (`--html-file mail.html`), as an operator keeps them; `render` prints
what TestRenderTemplate answers (the whole message), or one part with `--part`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("template", help="email templates (SES's): create, update, show, list, delete, render")
    s = p.add_subparsers(dest="template_command", required=True)
    for name in ("create", "update"):
        c = s.add_parser(name, help=f"{name} a template (Handlebars: {{{{name}}}}, {{{{#if}}}}, {{{{#each}}}}, ...)")
        c.add_argument("name")
        for part in ("subject", "text", "html"):
            g = c.add_mutually_exclusive_group()
            g.add_argument(f"--{part}", help=f"the {part} part")
            g.add_argument(f"--{part}-file", type=Path, help=f"read the {part} part from this file (UTF-8)")
        c.add_argument("--config", required=True)
    c = s.add_parser("show", help="a template's parts as JSON")
    c.add_argument("name")
    c.add_argument("--config", required=True)
    c = s.add_parser("list", help="every template with its creation time")
    c.add_argument("--config", required=True)
    c = s.add_parser("delete", help="delete a template")
    c.add_argument("name")
    c.add_argument("--config", required=True)
    c = s.add_parser("render", help="render a template with data, as TestRenderTemplate does")
    c.add_argument("name")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--data", default="{}", help="the rendering data: a JSON object")
    g.add_argument("--data-file", type=Path, help="read the rendering data from this file")
    c.add_argument("--part", choices=("subject", "text", "html"), help="print only this part")
    c.add_argument("--config", required=True)


def _part(args: argparse.Namespace, part: str) -> str | None:
    path = getattr(args, f"{part}_file")
    return path.read_text(encoding="utf-8") if path is not None else getattr(args, part)


def run(args: argparse.Namespace) -> int:
    from relay import templates
    from relay.core.templates import Template
    from relay.sets import SesError
    from relay.sets_cli import open_config_and_store

    cfg, store = open_config_and_store(args)
    command = args.template_command
    try:
        if command in ("create", "update"):
            template = Template(args.name, *(_part(args, p) for p in ("subject", "text", "html")))
            (templates.create if command == "create" else templates.update)(cfg, store, template)
            print(f"template {args.name} {command}d")
        elif command == "show":
            t = templates.get(store, args.name)
            print(json.dumps({"TemplateName": t.name, "SubjectPart": t.subject, "TextPart": t.text,
                              "HtmlPart": t.html, "CreatedTimestamp": templates.created_at(store, args.name)},
                             indent=2))
        elif command == "list":
            after = None
            while page := templates.listing(store, after, 1000):
                for name, created in page:
                    print(f"{name}\t{created}")
                after = page[-1][0]
        elif command == "delete":
            templates.delete(store, args.name)
            print(f"template {args.name} deleted")
        else:
            data = args.data_file.read_text(encoding="utf-8") if args.data_file else args.data
            rendered = templates.render(templates.get(store, args.name), data)
            if args.part:
                print(getattr(rendered, args.part) or "")
            else:
                sys.stdout.write(templates.rendered_message(cfg, rendered))
    except SesError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0
