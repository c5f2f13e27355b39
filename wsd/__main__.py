from wsd.cli import main

main()
