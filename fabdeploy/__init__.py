"""fabdeploy: Capistrano-grade deploys of Flask and other WSGI apps, as Fabric tasks.

In a fabfile.py:  from fabdeploy import ns
In a tasks.py:    from fabdeploy import deploy, rollback, releases, unlock, rotate_secret
"""
__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here

from invoke import Collection

from .tasks import (config, db_backups, db_restore, deploy, flask_command, logs, provision, releases, rollback,
                    rotate_secret, run_command, shell, status, unlock)

ns = Collection(deploy, rollback, releases, status, logs, unlock, rotate_secret, provision, config, db_backups,
                db_restore, flask_command, shell, run_command)

__all__ = ["ns", "deploy", "rollback", "releases", "status", "logs", "unlock", "rotate_secret", "provision",
           "config", "db_backups", "db_restore", "flask_command", "shell", "run_command"]
