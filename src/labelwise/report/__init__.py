"""Self-contained HTML reports (used by ``labelwise demo``), built from reusable pieces.

* images: :func:`colorize_label` (VOC palette), :func:`overlay` (alpha blend),
  :func:`label_overlay`, :func:`jet` (numpy jet-like colormap), :func:`heatmap`,
  :func:`png_data_uri`.
* plots: :func:`svg_line_plot` (inline SVG, one ``<polyline>`` per series).
* HTML: :func:`html_table`, :func:`img_html`, :func:`figure_row`, :class:`Section`,
  :func:`write_report` (atomic write of one self-contained page).
* real photos: :func:`classifier_cams` (CAMs of an ImageNet classifier's top classes).
"""

from labelwise.report.html import (Section, figure_row, format_value, headline, html_table, img_html,
                                   render_report, swatch, write_report)
from labelwise.report.images import (colorize_label, heatmap, jet, label_overlay, normalize_map, overlay,
                                     png_bytes, png_data_uri, resize_image, resize_map)
from labelwise.report.svg import nice_ticks, svg_line_plot

__all__ = [
    "Section", "figure_row", "format_value", "headline", "html_table", "img_html", "render_report",
    "swatch", "write_report", "colorize_label", "heatmap", "jet", "label_overlay", "normalize_map",
    "overlay", "png_bytes", "png_data_uri", "resize_image", "resize_map", "nice_ticks", "svg_line_plot",
]
