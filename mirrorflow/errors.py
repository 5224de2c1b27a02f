"""The exceptions mirrorflow raises itself, in one place.

::

    MirrorflowError
    ├── SettingsError          a MIRRORFLOW_* value is missing or malformed
    ├── TemporalUnavailable    Temporal could not be reached in time
    ├── StorageError           the attachment store refused or failed a call
    │   └── ChecksumMismatch   what was written is not what was read
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
    """The attachment store refused or failed a call."""


class ChecksumMismatch(StorageError):
    """The stored object's size or checksum differs from what was read."""


class SubscriberError(MirrorflowError):
    """The subscribers database refused a change."""


class UnknownSubscriber(SubscriberError):
    """No subscriber is registered for the given user token."""
