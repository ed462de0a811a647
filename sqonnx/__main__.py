from sqonnx.cli import main

main()
