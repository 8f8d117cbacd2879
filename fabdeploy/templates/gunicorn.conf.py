# Written by fabdeploy for {{app}} release {{release}}.
wsgi_app = {{wsgi}}
bind = [{{bind}}]
workers = {{workers}}
timeout = {{timeout}}
graceful_timeout = {{graceful_timeout}}
chdir = {{release_dir}}
# 0660 socket: only the app's user and nginx's group may connect.
umask = 0o007
errorlog = {{error_log}}
pidfile = {{pid_file}}
proc_name = {{proc_name}}
