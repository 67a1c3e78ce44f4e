"""The recovery manager: rollback strategies, their verification, and crash recovery."""
