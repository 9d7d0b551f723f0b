"""The republisher: delivers delayed messages from delay topics when they are due."""
