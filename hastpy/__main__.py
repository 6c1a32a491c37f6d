from hastpy.cli.hastd import main

main()
