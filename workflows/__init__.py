"""mirrorflow's Temporal workflows and the data types they exchange."""

from workflows.notification import NotificationWorkflow

__all__ = ["NotificationWorkflow"]
