"""The demo: teacher and student side by side on a Gradio page (`page`), answering (`answering`),
what it shows (`format`), the models it loads (`models`) and its examples (`examples`)."""
