"""fabdeploy: Capistrano-grade deploys of Flask and other WSGI apps, as Fabric tasks.

In a fabfile.py:  from fabdeploy import ns
In a tasks.py:    from fabdeploy import deploy, rollback, releases, unlock, rotate_secret
"""
from invoke import Collection

from .tasks import deploy, provision, releases, rollback, rotate_secret, unlock

ns = Collection(deploy, rollback, releases, unlock, rotate_secret, provision)

__all__ = ["ns", "deploy", "rollback", "releases", "unlock", "rotate_secret", "provision"]
