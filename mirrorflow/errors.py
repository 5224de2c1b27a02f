"""The exceptions mirrorflow raises itself, in one place.

::

    MirrorflowError
    ├── SettingsError          a MIRRORFLOW_* value is missing or malformed
    ├── TemporalUnavailable    Temporal could not be reached in time
    ├── StorageError           the attachment store failed a call; a retry may help
    │   ├── ChecksumMismatch   what was written is not what was read
    │   └── StorageRejected    a retry cannot help until someone changes something
    │       └── ObjectNotFound no object under the name asked for
    └── SubscriberError        the subscribers database refused a change
        └── UnknownSubscriber  no subscriber for this user token

Activities turn these into ``ApplicationError``s with the stable types listed
in :mod:`workflows.models`, so that the workflow history says what happened.
"""

from __future__ import annotations


class MirrorflowError(Exception):
    """Base class of every error mirrorflow raises on purpose."""


class SettingsError(MirrorflowError):
    """A setting is missing or malformed."""


class TemporalUnavailable(MirrorflowError):
    """Temporal could not be reached within the configured time."""


class StorageError(MirrorflowError):
    """The attachment store failed a call, for a reason a retry may fix."""


class ChecksumMismatch(StorageError):
    """The stored object's size or checksum differs from what was read."""


class StorageRejected(StorageError):
    """The store refused a call: a missing bucket, no permission, a bad name."""


class ObjectNotFound(StorageRejected):
    """No object is stored under the name asked for."""


class SubscriberError(MirrorflowError):
    """The subscribers database refused a change."""


class UnknownSubscriber(SubscriberError):
    """No subscriber is registered for the given user token."""
