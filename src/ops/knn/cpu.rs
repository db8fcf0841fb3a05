//! Placeholder on the knngpu branch (the kserve branch owns the CPU search).
