"""Render the files fabdeploy installs from the templates in the package."""
from __future__ import annotations

import re
from importlib import resources

from . import servers
from .layout import Layout
from .settings import Settings

PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render(template: str, **values) -> str:
    """Fill {{name}} placeholders; a missing value is a bug, so it raises."""
    text = resources.files("fabdeploy").joinpath("templates", template).read_text()
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def upstream_name(app: str) -> str:
    return "fabdeploy_" + re.sub(r"\W", "_", app)


def stamp(settings: Settings, release: str, active_bind: str) -> str:
    """What the site stamps on responses: the app, and over TCP (where each
    switch rewrites the site) the release too."""
    return settings.app if active_bind.startswith("unix:") else f"{settings.app}@{release}"


NEXT = "_next"  # the suffix of the preview's upstream, and of its stamp (agent.make_preview_map)


def proxy_site(settings: Settings, release: str, active_bind: str, backup_bind: str | None,
               layout: Layout | None = None) -> str:
    """The proxy's site for this switch: nginx's or Apache's.

    With `layout` (nginx over unix sockets), the site also routes requests
    that carry the host's preview token to shared/run/next.sock.
    """
    if settings["proxy"] == "apache":
        return apache_site(settings, release, active_bind, backup_bind)
    return nginx_site(settings, release, active_bind, backup_bind, layout)


def apache_member(bind: str) -> str:
    """gunicorn's bind as a mod_proxy address: unix:/x.sock|http://localhost, or http://host:port."""
    return f"{bind}|http://localhost" if bind.startswith("unix:") else f"http://{bind}"


def apache_site(settings: Settings, release: str, active_bind: str, backup_bind: str | None) -> str:
    apache = settings.values["apache"]
    name = apache["server_name"]
    server_name = "" if name in ("_", "") else f"    ServerName {name}\n"
    # disablereuse: a pooled backend connection would outlive a switch of the live link.
    backup = (f'        BalancerMember "{apache_member(backup_bind)}" status=+H disablereuse=On\n'
              if backup_bind else "")
    return render("apache-site.conf", app=settings.app, upstream=upstream_name(settings.app),
                  stamp=stamp(settings, release, active_bind), active=apache_member(active_bind),
                  backup=backup,
                  listen=apache["listen"], server_name=server_name)


def nginx_site(settings: Settings, release: str, active_bind: str, backup_bind: str | None,
               layout: Layout | None = None) -> str:
    nginx = settings.nginx
    upstream = upstream_name(settings.app)
    # gunicorn's bind syntax (unix:/x.sock, or host:port) is nginx's too.
    backup = f"    server {backup_bind} backup max_fails=0;\n" if backup_bind else ""
    site_stamp = stamp(settings, release, active_bind)
    preview, target = "", upstream
    if layout is not None:
        # $<upstream>_pick is "" for visitors and _next for the preview token (its map,
        # made by the agent, never leaves the server), in the upstream's name and the stamp.
        pick = f"${upstream}_pick"
        preview = render("nginx-preview.conf", upstream=upstream, pick=pick, next=NEXT,
                         next_socket=layout.next_socket, token_map=exact_glob(layout.preview_map))
        target, site_stamp = upstream + pick, site_stamp + pick
    return render("nginx-site.conf", app=settings.app, upstream=upstream, stamp=site_stamp,
                  active=active_bind, backup=backup, preview=preview, target=target,
                  listen=nginx["listen"], server_name=nginx["server_name"])


def exact_glob(path: str) -> str:
    """A glob that matches exactly `path`: nginx's include of a glob that matches
    nothing is no error, so a deleted deploy_to never breaks nginx's configuration."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}[.]{ext}" if dot and "/" not in ext else path


def gunicorn_conf(settings: Settings, layout: Layout, release: str, bind: str) -> str:
    g = settings.gunicorn
    return render("gunicorn.conf.py", app=settings.app, release=release,
                  wsgi=repr(settings["wsgi"]), bind=repr(bind), workers=int(g["workers"]),
                  worker_class=repr(servers.WORKERS[servers.worker(settings)][0]),
                  timeout=int(g["timeout"]), graceful_timeout=int(g["graceful_timeout"]),
                  release_dir=repr(layout.release(release)),
                  proc_name=repr(f"{settings.app}-{release}"))


def systemd_unit(settings: Settings, layout: Layout, user: str) -> str:
    return render("gunicorn@.service", app=settings.app, user=user, server=settings["server"],
                  group=settings.gunicorn["group"], root=layout.root,
                  stop_timeout=int(settings.gunicorn["graceful_timeout"]) + 10)
