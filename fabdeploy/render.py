"""Render the files fabdeploy installs from the templates in the package. No I/O here.

Every value that goes into a proxy site or a unit has been validated by
settings (hostnames, ports, names, plain paths); nothing else reaches them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from .catalog import WORKERS
from .layout import Layout, SystemPaths
from .model import Bind
from .settings import Listen, Settings

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
    listens: bool = False   # Apache: the site says Listen for its ports beyond ports.conf's
    root: str = ""          # deploy_to, absolute: where nginx finds `current` for static files
    system: bool = False    # root's site (provisioned): its log and certificates in root's places


def proxy_site(settings: Settings, shape: SiteShape) -> str:
    """The proxy's site: nginx's or Apache's."""
    if settings.proxy.kind == "apache":
        return apache_site(settings, shape)
    return nginx_site(settings, shape)


def listen_lines(settings: Settings, ipv6: bool, indent: str = "    ", tls: bool = False) -> str:
    """The site's listen lines: HTTP's (proxy.listen), or HTTPS's on tls.port at the same addresses."""
    lines = []
    for listen in https_listen(settings) if tls else settings.proxy.listen:
        options = " ssl http2" if tls else ""
        lines.append(f"{indent}listen {listen.nginx}{options};")
        if listen.address is None and ipv6:
            lines.append(f"{indent}listen [::]:{listen.port}{options};")
    return "\n".join(lines)


def https_listen(settings: Settings) -> tuple[Listen, ...]:
    return tuple(dict.fromkeys(Listen(settings.tls.port, listen.address) for listen in settings.proxy.listen))


def https_port(settings: Settings) -> str:
    """What a redirect to https adds after the host: nothing for 443, else :PORT."""
    return "" if settings.tls.port == 443 else f":{settings.tls.port}"


def apache_site(settings: Settings, shape: SiteShape) -> str:
    proxy = settings.proxy
    server_name = "" if proxy.catch_all else f"    ServerName {proxy.server_name[0]}\n" + "".join(
        f"    ServerAlias {alias}\n" for alias in proxy.server_name[1:])
    # disablereuse: a pooled backend connection would outlive a switch of the live link.
    backup = (f'        BalancerMember "{shape.backup.apache}" status=+H disablereuse=On\n'
              if shape.backup else "")
    hosts = apache_hosts(proxy.listen)
    redirect = tls = ""
    if settings.tls.enabled:
        redirect = render("apache-redirect.conf", hosts=hosts, server_name=server_name,
                          port=https_port(settings)) + "\n"
        hosts, tls = apache_hosts(https_listen(settings)), apache_tls(settings)
    return render("apache-site.conf", app=settings.app, upstream=upstream_name(settings.app),
                  stamp=stamp(settings, shape.active), active=shape.active.apache,
                  backup=backup, hosts=hosts, server_name=server_name, redirect=redirect, tls=tls,
                  listen=apache_listens(settings) if shape.listens else "")


def apache_listens(settings: Settings) -> str:
    """Listen for each port but Debian's (ports.conf: 80, and 443 with mod_ssl), once, whichever
    site says it first: Apache refuses a second Listen for one address and port."""
    lines = []
    for listen in settings.proxy.listen + (https_listen(settings) if settings.tls.enabled else ()):
        if listen.port in (80, 443) and listen.address is None:
            continue
        name = "fabdeploy_listen_" + re.sub(r"\W", "_", listen.nginx)
        lines.append(f"<IfDefine !{name}>\n    Define {name}\n    Listen {listen.nginx}\n</IfDefine>\n")
    return "".join(lines)


def apache_hosts(listens) -> str:
    return " ".join(f"*:{listen.port}" if listen.address is None else f"{listen.nginx}" for listen in listens)


def apache_tls(settings: Settings) -> str:
    lines = render("apache-tls.conf", bundle=tls_files(settings)[0])
    if settings.tls.hsts:
        lines += '    Header always set Strict-Transport-Security "max-age=31536000"\n'
    return lines


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
    proxy = render("nginx-proxy.conf", target=target)
    tls = settings.tls.enabled
    return render("nginx-site.conf", app=settings.app, upstream=upstream, stamp=site_stamp,
                  active=shape.active.nginx, backup=backup, preview=preview, proxy=proxy,
                  listen=listen_lines(settings, shape.ipv6, tls=tls),
                  server_name=" ".join(settings.proxy.server_name), access_log=access_log(settings, shape),
                  redirect=nginx_redirect(settings, shape) if tls else "",
                  tls=nginx_tls(settings) if tls else "", extra=nginx_extra(settings),
                  static_map=render("nginx-static-map.conf", upstream=upstream) if settings.static else "",
                  static=nginx_static(settings, shape, upstream, proxy))


def access_log(settings: Settings, shape: SiteShape) -> str:
    """root's site logs the app's requests in /var/log/nginx (rotated with the rest); where the
    deploy user runs nginx, its own configuration says where (never deploy_to, which may go)."""
    if not shape.system:
        return ""
    return f"    access_log {SystemPaths(settings.app).access_log} {upstream_name(settings.app)};\n"


def nginx_redirect(settings: Settings, shape: SiteShape) -> str:
    """Port 80 with TLS on: the ACME challenge (acme mode), and a redirect of the rest to https."""
    paths = SystemPaths(settings.app)
    challenge = render("nginx-challenge.conf", webroot=paths.acme_webroot) if settings.tls.acme else ""
    return render("nginx-redirect.conf", listen=listen_lines(settings, shape.ipv6),
                  server_name=" ".join(settings.proxy.server_name), access_log=access_log(settings, shape),
                  upstream=upstream_name(settings.app), challenge=challenge,
                  port=https_port(settings)) + "\n"


def tls_files(settings: Settings) -> tuple[str, str]:
    """The certificate chain and key the site names: certbot's (linked) or yours (one file)."""
    folder = SystemPaths(settings.app).tls_dir
    if settings.tls.acme:
        return f"{folder}/fullchain.pem", f"{folder}/privkey.pem"
    return f"{folder}/bundle.pem", f"{folder}/bundle.pem"


def nginx_tls(settings: Settings) -> str:
    cert, key = tls_files(settings)
    lines = render("nginx-tls.conf", cert=cert, key=key)
    if settings.tls.hsts:
        lines += '    add_header Strict-Transport-Security "max-age=31536000" always;\n'
    return lines


def nginx_extra(settings: Settings) -> str:
    """proxy.extra: each value was checked at load against a narrow pattern."""
    extra = settings.proxy.extra
    lines = []
    if extra.client_max_body_size:
        lines.append(f"    client_max_body_size {extra.client_max_body_size};")
    if extra.proxy_read_timeout:
        lines.append(f"    proxy_read_timeout {extra.proxy_read_timeout}s;")
    lines += [f'    add_header {name} "{value}" always;' for name, value in extra.headers]
    for prefix, folder in extra.locations:
        lines += [f"    location ^~ {prefix} {{", f"        alias {folder};",
                  "        disable_symlinks if_not_owner;", "    }"]
    return "".join(f"{line}\n" for line in lines)


def nginx_static(settings: Settings, shape: SiteShape, upstream: str, proxy: str) -> str:
    if not settings.static:
        return ""
    locations = "".join(render("nginx-static.conf", prefix=d.prefix, root=shape.root, upstream=upstream)
                        for d in settings.static)
    return locations + render("nginx-static-app.conf", upstream=upstream, proxy=proxy)


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
