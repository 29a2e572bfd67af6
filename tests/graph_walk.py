"""What a traced op waits for: its ancestors in the graph, for tests only."""

from typing import Dict

import tensorflow as tf


def ancestors(op: tf.Operation, through_control: bool = True
              ) -> Dict[str, tf.Operation]:
  """Every op `op` depends on, by name, `op` itself included: through its inputs,
  and through control edges too unless `through_control` is False."""
  seen, stack = {}, [op]
  while stack:
    node = stack.pop()
    if node.name not in seen:
      seen[node.name] = node
      stack.extend(t.op for t in node.inputs)
      if through_control:
        stack.extend(node.control_inputs)
  return seen
