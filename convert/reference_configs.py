"""DeepSeek-V4-Flash's config.json fields that decide sizes, for planning without the checkpoint at hand.

Values from the release's config.json (see docs/architecture: "Configuration (DeepSeek-V4-Flash)");
`dsv4 convert --dry-run` on the real repo reads the real file instead.
"""

FLASH_REPO = "deepseek-ai/DeepSeek-V4-Flash"

from ..model.presets import FLASH_CONFIG  # noqa: E402,F401  (one definition, shared with the planner)
