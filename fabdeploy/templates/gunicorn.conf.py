# Written by fabdeploy for {{app}} release {{release}}.
wsgi_app = {{wsgi}}
bind = [{{bind}}]
workers = {{workers}}
worker_class = {{worker_class}}
timeout = {{timeout}}
graceful_timeout = {{graceful_timeout}}
chdir = {{release_dir}}
# 0660 socket: only the app's user and nginx's group may connect. gunicorn
# applies this umask only when it binds the socket (and to worker temp files),
# and a socket's mode is 0777 less the umask.
umask = 0o117
# To stderr, which the release's serve script sends to the app's log.
errorlog = "-"
proc_name = {{proc_name}}
# gunicorn >= 27 opens a control socket at one path per user: two releases
# running side by side would fight over it. Older versions ignore this name.
control_socket_disable = True
