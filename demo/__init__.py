"""The Gradio side-by-side demo (teacher vs student)."""
