//! Degraded mode's classifier (placeholder until the rtnetlink watcher lands).
