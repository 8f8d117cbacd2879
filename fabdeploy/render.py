"""Render the files fabdeploy installs from the templates in the package. No I/O here.

Every value that goes into a proxy site or a unit has been validated by
settings (hostnames, ports, names, plain paths); nothing else reaches them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from .catalog import WORKERS
from .layout import Layout
from .model import Bind
from .settings import Settings

PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
NEXT = "_next"  # the suffix of the preview's upstream and of its stamp (agent.NEXT)


def render(template: str, **values) -> str:
    """Fill {{name}} placeholders; a missing value is a bug, so it raises."""
    text = resources.files("fabdeploy").joinpath("templates", template).read_text()
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def upstream_name(app: str) -> str:
    return "fabdeploy_" + re.sub(r"\W", "_", app)


def stamp(settings: Settings, active: Bind) -> str:
    """What the site stamps on responses: the app, and over TCP (where each
    switch changes the site) the port it sends visitors to."""
    return settings.app if active.is_unix else f"{settings.app}@{active.port}"


@dataclass(frozen=True)
class SiteShape:
    """What a site is rendered for beside the settings: its upstreams and where the token is."""

    release: str
    active: Bind
    backup: Bind | None = None
    preview_map: str | None = None  # a map file: the site has a preview through next.sock
    next_socket: str | None = None
    ipv6: bool = False
    listens: bool = False           # Apache: the site says Listen for its ports beyond ports.conf's


def proxy_site(settings: Settings, shape: SiteShape) -> str:
    """The proxy's site: nginx's or Apache's."""
    if settings.proxy.kind == "apache":
        return apache_site(settings, shape)
    return nginx_site(settings, shape)


def listen_lines(settings: Settings, ipv6: bool, indent: str = "    ") -> str:
    lines = []
    for listen in settings.proxy.listen:
        lines.append(f"{indent}listen {listen.nginx};")
        if listen.address is None and ipv6:
            lines.append(f"{indent}listen [::]:{listen.port};")
    return "\n".join(lines)


def apache_site(settings: Settings, shape: SiteShape) -> str:
    proxy = settings.proxy
    server_name = "" if proxy.catch_all else f"    ServerName {proxy.server_name[0]}\n" + "".join(
        f"    ServerAlias {alias}\n" for alias in proxy.server_name[1:])
    # disablereuse: a pooled backend connection would outlive a switch of the live link.
    backup = (f'        BalancerMember "{shape.backup.apache}" status=+H disablereuse=On\n'
              if shape.backup else "")
    hosts = " ".join(f"*:{listen.port}" if listen.address is None else f"{listen.nginx}"
                     for listen in proxy.listen)
    return render("apache-site.conf", app=settings.app, upstream=upstream_name(settings.app),
                  stamp=stamp(settings, shape.active), active=shape.active.apache,
                  backup=backup, hosts=hosts, server_name=server_name,
                  listen=apache_listens(settings) if shape.listens else "")


def apache_listens(settings: Settings) -> str:
    """Listen for each port but Debian's (ports.conf: 80, and 443 with mod_ssl), once, whichever
    site says it first: Apache refuses a second Listen for one address and port."""
    lines = []
    for listen in settings.proxy.listen:
        if listen.port in (80, 443) and listen.address is None:
            continue
        name = "fabdeploy_listen_" + re.sub(r"\W", "_", listen.nginx)
        lines.append(f"<IfDefine !{name}>\n    Define {name}\n    Listen {listen.nginx}\n</IfDefine>\n")
    return "".join(lines)


def nginx_site(settings: Settings, shape: SiteShape) -> str:
    upstream = upstream_name(settings.app)
    backup = f"    server {shape.backup.nginx} backup max_fails=0;\n" if shape.backup else ""
    site_stamp = stamp(settings, shape.active)
    preview, target = "", upstream
    if shape.preview_map:
        # $<upstream>_pick is "" for visitors and _next for the preview token (its map never
        # leaves the server), in the upstream's name and the stamp.
        pick = f"${upstream}_pick"
        preview = render("nginx-preview.conf", upstream=upstream, pick=pick, next=NEXT,
                         next_socket=shape.next_socket, token_map=exact_glob(shape.preview_map))
        target, site_stamp = upstream + pick, site_stamp + pick
    return render("nginx-site.conf", app=settings.app, upstream=upstream, stamp=site_stamp,
                  active=shape.active.nginx, backup=backup, preview=preview, target=target,
                  listen=listen_lines(settings, shape.ipv6),
                  server_name=" ".join(settings.proxy.server_name))


def exact_glob(path: str) -> str:
    """A glob that matches exactly `path`: nginx's include of a glob that matches
    nothing is no error, so a deleted file never breaks nginx's configuration."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}[.]{ext}" if dot and "/" not in ext else path


def gunicorn_conf(settings: Settings, layout: Layout, release: str, bind: Bind) -> str:
    server = settings.server
    return render("gunicorn.conf.py", app=settings.app, release=release,
                  wsgi=repr(settings.wsgi), bind=repr(bind.gunicorn), workers=server.workers,
                  worker_class=repr(WORKERS[server.worker_class][0]),
                  timeout=server.timeout, graceful_timeout=server.graceful_timeout,
                  release_dir=repr(layout.release(release)),
                  proc_name=repr(f"{settings.app}-{release}"))


def logrotate_rule(settings: Settings, root: str, user: str) -> str:
    """The app's logs, rotated as their owner (su: root never follows the app's links)."""
    return render("logrotate", root=root, user=user, group=settings.group)


def systemd_unit(settings: Settings, root: str, user: str) -> str:
    """The release units' template, `<app>@.service`: root's file, run as the deploy user."""
    return render("app@.service", app=settings.app, user=user, server=settings.server.kind,
                  group=settings.group, root=root,
                  stop_timeout=settings.server.graceful_timeout + 10)


# -- a release's other processes, and timers (issue 15) ---------------------------------------

def process_unit(settings: Settings, root: str, user: str, name: str) -> str:
    """A process's template, `<app>.<name>@.service`: root's file, the web unit's hardening."""
    return render("process@.service", app=settings.app, name=name, user=user, group=settings.group,
                  root=root, stop_timeout=settings.server.graceful_timeout + 10)


def timer_service(settings: Settings, root: str, user: str, name: str) -> str:
    """What a timer starts: current's script for it, once."""
    return render("timer.service", app=settings.app, name=name, user=user, group=settings.group, root=root)


def timer_timer(settings: Settings, name: str, on_calendar: str, service: str) -> str:
    return render("timer.timer", app=settings.app, name=name, on_calendar=on_calendar, service=service)
