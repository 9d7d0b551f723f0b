"""The deploy files are valid for the tools that read them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_ray_cluster_yaml_matches_rays_schema() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "ray-cluster.yaml").read_text())
    schema_path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t != config["head_node_type"] and types[t].get("min_workers", 0) >= 1
               for t in types), "a worker node type with workers"
    assert any("pip install" in c and "athomic" in c for c in config["setup_commands"])
