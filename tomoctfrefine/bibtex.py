"""
@article{Burt2024,
  title = {An image processing pipeline for electron cryo-tomography in RELION-5},
  author = {Burt, Alister and Toader, Bogdan and Warshamanage, Rangana and von Kügelgen, Andriko and Pyle, Euan and Zivanov, Jasenko and Kimanius, Dari and Bharat, Tanmay A. M. and Scheres, Sjors H. W.},
  journal = {FEBS Open Bio},
  volume = {14},
  number = {11},
  pages = {1788--1804},
  year = {2024},
  doi = {10.1002/2211-5463.13873}
}

@article{Zivanov2022,
  title = {A Bayesian approach to single-particle electron cryo-tomography in RELION-4.0},
  author = {Zivanov, Jasenko and Otón, Joaquín and Ke, Zunlong and von Kügelgen, Andriko and Pyle, Euan and Qu, Kun and Morado, Dustin and Castaño-Díez, Daniel and Zanetti, Giulia and Bharat, Tanmay A. M. and Briggs, John A. G. and Scheres, Sjors H. W.},
  journal = {eLife},
  volume = {11},
  pages = {e83724},
  year = {2022},
  doi = {10.7554/eLife.83724}
}
"""
