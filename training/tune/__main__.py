from clipray.cli import main_for

main_for("tune")
