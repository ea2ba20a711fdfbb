"""HTTP routes: captions, vqa, models, health (+ metrics) and the web page."""
